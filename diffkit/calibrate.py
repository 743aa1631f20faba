"""Which exclusive and changed calls survive a null: model-level evidence, p-values, q-values.

Why: one-to-one assignment calls *every* SAE feature without a partner "unmatched", and most of
those are SAE-training noise (a junk latent of one SAE is reproduced by nothing in the other,
whatever the models share). The evidence that a feature is exclusive to model A has to come from
the *models*: can B's residual predict the feature's activation as well as A's own residual can?

Statistics (streamed on align's one pass, :class:`ProbeSums` / :class:`ManyToOneSums`; no token kept):

- **r2_own / r2_other** (per SAE feature f of model M, other model O): held-out R² of an affine
  ridge probe ``f ≈ wᵀx + b`` fitted on the store's train split, from M's / O's raw residual x.
  Closed form from Σx, Σxxᵀ, Σxf, Σf, Σf² (all features at once): ``w = (C_xx + λI)⁻¹ c_xf`` with
  ``C_xx``, ``c_xf`` the train covariances, ``λ = 1e-4 · tr(C_xx)/d``; held-out
  ``R² = 1 − E_h[(f − f̂)²] / Var_h(f)`` from the held-out split's own sums (the train-split
  probe applied to held-out moments: no second pass). Without held-out tokens (or with
  ``--split train/heldout``) the probe is fitted and scored on the same tokens.
- **retention** = ``r2_other / r2_own`` (NaN when ``r2_own < R2_FLOOR``: a feature its own model's
  residual cannot linearly predict gives no model-level evidence either way). About 1 when the
  other model carries the feature's information linearly, about 0 when it does not. The ratio, not
  ``r2_other``, because TopK features are far from linear in the residual (the own R² is the
  ceiling a linear probe can reach for that feature).
- **many_to_one_r2** (unmatched features only): R² of the feature's activation regressed (OLS,
  intercept) on the best 4 of the other SAE's features, chosen greedily among its 32 candidates
  by carried decoder cosine (``cos(W_dec_A[i] W_ab, W_dec_B[j])``). Needs Σ f_i f_j only for the
  candidate pairs and candidate-candidate pairs, accumulated from each token's active features:
  memory O(unmatched × 32²), never n_a × n_b. High: the other SAE split or absorbed the feature.

Nulls and p-values (:func:`calibrate`):

- **p_exclusive** (unmatched rows): one-sided empirical p-value of the row's retention against a
  reference set of retentions of features that are not exclusive,
  ``p = (1 + #{ref ≤ retention}) / (1 + N_ref)``, below the reference's minimum continued by an
  exponential tail ``exp(−(min ref − retention) / s) / (1 + N)``, s = 1.4826 · MAD of the reference
  (:func:`tailed_p_lower`: without it BH cannot call fewer than ~0.1·N/m features); 1 where
  retention is NaN. Reference set: the
  *matched-pair null* — retentions of the features (both sides) in pairs matched at similarity
  ≥ the threshold, i.e. shared by the assignment's own account; it needs no second SAE or model.
  Shared rows get the p-value of their lower retention (leave-one-in: conservative) and no q.
- **p_changed** (shared rows), statistic ``|act_mass_log_ratio|``: with a second SAE of a model
  (``--null-sae-a`` / ``--null-sae-b``) the **SAE-seed null**: the same centred act-mass log ratio
  between that model's two SAEs on the same tokens (pairs matched by decoder cosine ≥ the
  threshold), ``p = (1 + #{|null| ≥ |x|}) / (1 + N)``. Without one, the **model-free empirical
  null** (Efron 2004): ``z = (x − median) / (1.4826 · MAD)`` over the shared pairs, two-sided
  normal p — the bulk of the pairs is taken as unchanged.
- **p_map_error** (every row, when the FeatureDiff has the map-error columns: ``align --rank-by
  map-error``, or a :class:`diffkit.divergence.Divergence` on align's pass), statistic the
  feature's ``map_err`` (the map's error where it fires over the mean error): the **model-free
  empirical null** of :func:`map_error_p` over each SAE's live features; a shared pair gets twice
  the smaller of its two sides' p (Bonferroni). No SAE noise moves it: the error is the models'.
  On the organisms it is the call that finds planted features (``diffkit bench organisms``, its
  "calibrated calls" table); the SAE-level tests above call none of them.
- **q** = Benjamini–Hochberg adjusted p (``scipy.stats.false_discovery_control``), exclusive over
  the unmatched rows, changed over the shared rows. **verdict**: ``a_only`` / ``b_only`` when the
  row is unmatched and ``q_exclusive ≤ fdr``; ``unmatched`` when unmatched without model-level
  evidence; ``changed`` when shared and ``q_changed ≤ fdr``, or (any row not called exclusive)
  ``q_map_error ≤ fdr`` (BH over all rows); else ``shared``. With a seed SAE of
  the row's model given, an exclusive verdict also needs the feature to be reproduced by it
  (``seed_cosine ≥`` the threshold): a feature one SAE seed found and another did not is SAE noise.

Why retention decides, not many-to-one: on ``diffkit bench groundtruth``'s seed-pair control
(nothing exclusive), the unmatched features' many-to-one R² is as low as the planted-exclusive
ones' in the main case (a junk latent is reproduced by nothing), while retention separates
(``reports/groundtruth/``; figures in the module docstring of :mod:`diffkit.diff`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .codes import as_codes

R2_FLOOR = 0.05
RIDGE = 1e-4
N_CANDIDATES = 32
N_PICK = 4
DEFAULT_FDR = 0.1
MAP_EXACT = 1e-6  # unexplained variance of a map below which its error is rounding (the same model twice)
MIN_PAIR_CORR = 0.5  # a shared pair whose features do not co-fire (corr < this) is no one feature: no "changed" test
_PAIR_ELEMENTS = 1 << 23  # rows × k² pair products per chunk in the co-activation sums


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH adjusted p-values (q): ``q_(i) = min_{j ≥ i} p_(j) · m / j``; NaN entries stay NaN, not counted in m."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(np.clip(p[ok], 0.0, 1.0), method="bh")
    return q


def empirical_p_lower(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """One-sided empirical p of each ``x`` being this low: (1 + #{ref ≤ x}) / (1 + N); NaN x -> 1."""
    ref = np.sort(np.asarray(ref, np.float64)[np.isfinite(ref)])
    x = np.asarray(x, np.float64)
    p = (1.0 + np.searchsorted(ref, np.where(np.isfinite(x), x, np.inf), side="right")) / (1.0 + len(ref))
    return np.minimum(p, 1.0)


def tailed_p_lower(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """:func:`empirical_p_lower` with an exponential tail below the reference's minimum:
    ``p = exp(−(min ref − x) / s) / (1 + N)``, s = 1.4826 · MAD(ref). The plain empirical p stops at
    1 / (1 + N), so Benjamini–Hochberg could only call ≥ 0.1·(1 + N)/m... features at once: with fewer true
    exclusives than that nothing would pass, however clear. Continuous at the minimum; equal above it."""
    ref = np.asarray(ref, np.float64)
    ref = ref[np.isfinite(ref)]
    p = empirical_p_lower(x, ref)
    if len(ref) < 3:
        return p
    x = np.asarray(x, np.float64)
    lo = ref.min()
    scale = max(1.4826 * float(np.median(np.abs(ref - np.median(ref)))), 1e-6)
    below = np.isfinite(x) & (x < lo)
    p[below] = np.exp(-(lo - x[below]) / scale) / (1.0 + len(ref))
    return p


def empirical_p_upper(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """One-sided empirical p of each ``x`` being this high: (1 + #{ref ≥ x}) / (1 + N); NaN x -> 1."""
    return empirical_p_lower(-np.asarray(x, np.float64), -np.asarray(ref, np.float64))


def robust_t_p(x: np.ndarray, dof: float | None = 3.0, upper: bool = False) -> np.ndarray:
    """p under an empirical null fitted to the bulk (Efron 2004): x − median ~ s · t_dof (normal for
    ``dof=None``), s = MAD / (median |t_dof|); two-sided, or one-sided for high x with ``upper``;
    NaN x -> NaN. For the act-mass ratio, dof 3: a normal null called 7% of the correctly matched
    pairs of the seed-pair control "changed"; SAE noise in the ratio is heavy-tailed."""
    from scipy.stats import norm, t

    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    p = np.where(ok, 1.0, np.nan)
    if ok.sum() < 3:
        return p
    med = np.median(x[ok])
    mad = np.median(np.abs(x[ok] - med))
    if mad <= 0:
        return p
    dist = norm if dof is None else t(dof)
    z = (x[ok] - med) / (mad / dist.ppf(0.75))
    p[ok] = dist.sf(z) if upper else 2 * dist.sf(np.abs(z))
    return p


def map_error_p(map_err: np.ndarray) -> np.ndarray:
    """One-sided p of each feature's map error (:mod:`diffkit.divergence`'s ``map_err``, 1 = no more error
    than anywhere) being this high: the model-free empirical null ``log map_err ~ N(median, (1.4826 MAD)²)``
    over one SAE's live features, the bulk taken as unchanged. Normal, not t_3 as for the act-mass
    ratio: on the organisms (reports/organisms, ``diffkit bench organisms``) t_3 called none of the
    backdoor's planted features at FDR 10%, while the normal null called 0.9% of the features on the
    null fine-tune; a fine-tune's changed features sit far out in the upper tail, the error of
    unchanged ones is not heavy-tailed the way an SAE-noise ratio is. NaN -> NaN, outside the null
    (:func:`_map_error_rows` passes NaN for features that never fired)."""
    x = np.asarray(map_err, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logx = np.where(np.isfinite(x) & (x > 0), np.log(np.where(x > 0, x, 1.0)), np.nan)
    return robust_t_p(logx, dof=None, upper=True)


# -- streamed sums ---------------------------------------------------------------------------------

def train_mask_fn(store: Any, split: str):
    """``f(row0, n)`` -> bool mask of which rows of align's unshuffled pass over ``split`` are train rows.

    Only for ``split == "all"`` with held-out tokens (iter_batches yields each shard's train rows,
    then its held-out rows, shard by shard); otherwise None (fit and score on the same rows)."""
    import torch

    if split != "all" or store.n_tokens("heldout") == 0:
        return None
    n_train = np.array([s["n_train"] for s in store.manifest["shards"]], dtype=np.int64)
    n_all = np.array([s["n_tokens"] for s in store.manifest["shards"]], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(n_all)])

    def mask(row0: int, n: int) -> Any:
        rows = np.arange(row0, row0 + n)
        shard = np.searchsorted(starts, rows, side="right") - 1
        return torch.from_numpy(rows - starts[shard] < n_train[shard])

    return mask


class _Moments:
    """Σ over rows of one part (train or held-out): per model Σx, Σxxᵀ; per feature set Σf, Σf², Σ f xᵀ."""

    def __init__(self, d: dict, n: dict, cross_dtype: Any):
        import torch

        f64 = torch.float64
        self.rows = 0
        self.sx = {m: torch.zeros(d[m], dtype=f64) for m in d}
        self.sxx = {m: torch.zeros(d[m], d[m], dtype=f64) for m in d}
        self.sf = {s: torch.zeros(n[s], dtype=f64) for s in n}
        self.sff = {s: torch.zeros(n[s], dtype=f64) for s in n}
        self.sxf = {(m, s): torch.zeros(n[s], d[m], dtype=cross_dtype) for m in d for s in n}  # (features, d)

    def add(self, x: dict, f: dict) -> None:
        """``x``: model -> (rows, d) float64; ``f``: feature set -> its (row, col, val) nonzero entries,
        or the dense (rows, features) codes when they are dense."""
        import torch

        self.rows += len(next(iter(x.values())))
        for m, xm in x.items():
            self.sx[m] += xm.sum(0)
            self.sxx[m] += xm.T @ xm
        for s, fs in f.items():
            if torch.is_tensor(fs):  # dense codes (diffkit.codes.DENSE_ABOVE): sums and GEMMs
                f64 = fs.double()
                self.sf[s] += f64.sum(0)
                self.sff[s] += (f64 * f64).sum(0)
                for m, xm in x.items():
                    self.sxf[(m, s)] += (f64.T @ xm).to(self.sxf[(m, s)].dtype)
                continue
            row, col, val = fs
            self.sf[s].index_add_(0, col, val)
            self.sff[s].index_add_(0, col, val * val)
            for m, xm in x.items():  # Σ f xᵀ: O(active × d), in slices of ~2^22 numbers
                acc, step = self.sxf[(m, s)], max(1, (1 << 22) // xm.shape[1])
                for lo in range(0, len(col), step):
                    sl = slice(lo, lo + step)
                    acc.index_add_(0, col[sl], (val[sl, None] * xm[row[sl]]).to(acc.dtype))


class ProbeSums:
    """Streamed sums for :func:`probe_r2` (a :class:`diffkit.diff.StatAccumulator`).

    Memory: per part (train, held-out) d_m² per model and features × d_m per (model, feature set),
    float32 when large (x is shifted by the first batch's mean, so float32 keeps ~6 digits of
    centred sums). Features: all of them when the cross sums fit ``budget_bytes`` and the probes'
    solves ``budget_flops``; otherwise (told by :meth:`prepare`) the unmatched features plus a seeded
    sample of ``null_sample`` others per side, enough for the null (the other matched rows then have
    NaN retention) — never n_a × d for 65k features when most are matched."""

    def __init__(self, d_a: int, d_b: int, n_a: int, n_b: int, train_mask: Any = None,
                 budget_bytes: float = 1.5 * 2 ** 30, null_sample: int = 4096, seed: int = 0,
                 budget_flops: float = 1e11):
        self.d, self.n = {"a": d_a, "b": d_b}, {"a": n_a, "b": n_b}
        self.train_mask, self.budget, self.null_sample, self.seed = train_mask, budget_bytes, null_sample, seed
        self.budget_flops = budget_flops  # the probes' solve costs ~8·d² per (feature, model): 16k × d 1024 is 1.4e11
        self.cols: dict | None = None
        self.parts: dict = {}
        self.shift: dict | None = None
        self.row0 = 0

    def _bytes(self, n: dict, itemsize: int) -> float:
        parts = 2 if self.train_mask is not None else 1
        return parts * itemsize * sum(self.d[m] * n[s] for m in self.d for s in n)

    def prepare(self, a_targets: np.ndarray, b_targets: np.ndarray, assignment: Any = None) -> None:
        flops = sum(8 * self.d[m] ** 2 * self.n[s] for m in self.d for s in self.n)
        if self._bytes(self.n, 4) <= self.budget and flops <= self.budget_flops:
            return
        rng = np.random.default_rng(self.seed)
        self.cols = {}
        for s, targets in (("a", a_targets), ("b", b_targets)):
            rest = np.setdiff1d(np.arange(self.n[s]), targets)
            sample = rng.choice(rest, min(self.null_sample, len(rest)), replace=False)
            self.cols[s] = np.union1d(targets, sample).astype(np.int64)
        import torch

        self.col_pos = {}
        for s, cols in self.cols.items():
            self.col_pos[s] = torch.full((self.n[s],), -1, dtype=torch.int64)
            self.col_pos[s][torch.from_numpy(cols)] = torch.arange(len(cols))

    def _allocate(self) -> None:
        import torch

        n = self.n if self.cols is None else {s: len(c) for s, c in self.cols.items()}
        dtype = torch.float64 if self._bytes(n, 8) <= self.budget else torch.float32
        self.parts = {"train": _Moments(self.d, n, dtype)}
        if self.train_mask is not None:
            self.parts["heldout"] = _Moments(self.d, n, dtype)

    def update(self, xa: Any, xb: Any, fa: Any, fb: Any) -> None:
        import torch

        if not self.parts:
            self._allocate()
        x = {"a": xa.double(), "b": xb.double()}
        if self.shift is None:
            self.shift = {m: v.mean(0) for m, v in x.items()}
        x = {m: v - self.shift[m] for m, v in x.items()}
        f = {}
        for s, codes in (("a", as_codes(fa)), ("b", as_codes(fb))):
            if codes.is_dense:
                f[s] = codes.dense if self.cols is None else codes.dense[:, torch.from_numpy(self.cols[s])]
                continue
            row, col, val = codes.entries()
            if self.cols is not None:  # only the probed features, renumbered 0..len(cols)
                pos = self.col_pos[s][col]
                keep = pos >= 0
                row, col, val = row[keep], pos[keep], val[keep]
            f[s] = (row, col, val)
        if self.train_mask is None:
            self.parts["train"].add(x, f)
        else:
            mask = self.train_mask(self.row0, len(xa))
            for part, sel in (("train", mask), ("heldout", ~mask)):
                if bool(sel.any()):
                    renumber = torch.cumsum(sel, 0) - 1  # row -> its index among the selected rows
                    sub = {s: _rows_of(fs, sel, renumber) for s, fs in f.items()}
                    self.parts[part].add({m: v[sel] for m, v in x.items()}, sub)
        self.row0 += len(xa)

    def r2(self, model: str, features: str, chunk: int = 4096) -> np.ndarray:
        """Held-out (or in-sample) R² of each feature of ``features`` from ``model``'s residual (NaN: not probed)."""
        vals = probe_r2(self.parts["train"], self.parts.get("heldout"), model, features, chunk)
        if self.cols is None:
            return vals
        out = np.full(self.n[features], np.nan)
        out[self.cols[features]] = vals
        return out


def _rows_of(fs: Any, sel: Any, renumber: Any) -> Any:
    """The codes of the rows ``sel`` of a batch: dense codes sliced, or entries kept and renumbered."""
    import torch

    if torch.is_tensor(fs):
        return fs[sel]
    row, col, val = fs
    keep = sel[row]
    return renumber[row[keep]], col[keep], val[keep]


def _centred(part: _Moments, m: str, s: str, mu_x: Any = None, mu_f: Any = None):
    """Second moments about (mu_x, mu_f) (default: the part's own means): C_xx, C_xf (features × d), var_f."""
    import torch

    n = max(part.rows, 1)
    ex, ef = part.sx[m] / n, part.sf[s] / n
    mu_x = ex if mu_x is None else mu_x
    mu_f = ef if mu_f is None else mu_f
    cxx = part.sxx[m] / n - torch.outer(ex, mu_x) - torch.outer(mu_x, ex) + torch.outer(mu_x, mu_x)
    cxf = (part.sxf[(m, s)].double() / n - torch.outer(ef, mu_x) - torch.outer(mu_f, ex) + torch.outer(mu_f, mu_x))
    vf = part.sff[s] / n - 2 * ef * mu_f + mu_f ** 2
    return cxx, cxf, vf


def probe_r2(train: _Moments, heldout: _Moments | None, m: str, s: str, chunk: int = 4096) -> np.ndarray:
    """R² of the ridge probe (module docstring), evaluated on ``heldout``'s moments when given."""
    import torch

    cxx, cxf, vf = _centred(train, m, s)
    d = cxx.shape[0]
    lam = RIDGE * float(torch.trace(cxx)) / d
    chol = torch.linalg.cholesky(cxx + lam * torch.eye(d, dtype=cxx.dtype))
    if heldout is not None and heldout.rows > 0:
        n = train.rows
        mu_x, mu_f = train.sx[m] / n, train.sf[s] / n
        hxx, hxf, _ = _centred(heldout, m, s, mu_x, mu_f)
        hv = heldout.sff[s] / heldout.rows - (heldout.sf[s] / heldout.rows) ** 2  # Var_h(f)
        h2 = heldout.sff[s] / heldout.rows - 2 * (heldout.sf[s] / heldout.rows) * mu_f + mu_f ** 2  # E_h[(f−μ_f)²]
    else:
        hxx, hxf, hv, h2 = cxx, cxf, vf, vf
    out = np.full(len(vf), np.nan)
    for i in range(0, len(vf), chunk):
        sl = slice(i, i + chunk)
        w = torch.cholesky_solve(cxf[sl].T, chol)                      # (d, chunk)
        mse = h2[sl] - 2 * (w * hxf[sl].T).sum(0) + (w * (hxx @ w)).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = (1 - mse / hv[sl]).numpy()
        out[i:i + chunk] = np.where(hv[sl].numpy() > 1e-12, r2, np.nan)
    return out


class ManyToOneSums:
    """Σ f_i f_j over the candidate pairs of the many-to-one fit (a StatAccumulator).

    Targets are set by :meth:`prepare` (align calls it after the assignment, before its pass): the
    unmatched features of each side, each with its ``N_CANDIDATES`` best candidates on the other side
    by carried decoder cosine — from the sparse solver's candidate graph when it has one (no new
    search), else a chunked search over the targets only."""

    def __init__(self, carried: np.ndarray, dirs_b: np.ndarray, n_candidates: int = N_CANDIDATES):
        self.carried, self.dirs_b, self.n_cand = carried, dirs_b, n_candidates
        self.sides: dict = {}

    def prepare(self, a_targets: np.ndarray, b_targets: np.ndarray, assignment: Any = None) -> None:
        import torch

        edges = getattr(assignment, "candidates", None)
        for side, targets in (("a", a_targets), ("b", b_targets)):
            targets = np.asarray(targets, np.int64)
            n_other = len(self.dirs_b if side == "a" else self.carried)
            k = min(self.n_cand, n_other)
            if not len(targets) or k == 0:
                continue
            cand = _candidates_from_edges(edges, side, targets, k) if edges is not None else None
            if cand is None:
                from .matching import unit_rows

                own = unit_rows(self.carried if side == "a" else self.dirs_b).float()
                other = unit_rows(self.dirs_b if side == "a" else self.carried).float()
                cand = torch.cat([(own[torch.from_numpy(targets[i:i + 1024])] @ other.T).topk(k, dim=1).indices
                                  for i in range(0, len(targets), 1024)]).numpy()
            # Codes of the pairs to sum: (target, candidate) and candidate-candidate (upper triangle).
            iu, ju = np.triu_indices(cand.shape[1])
            cross = np.unique(targets[:, None] * n_other + cand)
            cc = np.unique(np.minimum(cand[:, iu], cand[:, ju]) * n_other + np.maximum(cand[:, iu], cand[:, ju]))
            self.sides[side] = {"targets": targets, "cand": cand, "n_other": n_other,
                                "cross_codes": torch.from_numpy(cross), "cross": torch.zeros(len(cross), dtype=torch.float64),
                                "cc_codes": torch.from_numpy(cc), "cc": torch.zeros(len(cc), dtype=torch.float64)}

    def update(self, xa: Any, xb: Any, fa: Any, fb: Any) -> None:
        import torch

        if not self.sides:
            return
        act = {"a": as_codes(fa).padded(), "b": as_codes(fb).padded()}
        for side, st in self.sides.items():
            (io, vo), (it, vt) = act[side], act["b" if side == "a" else "a"]
            n_other = st["n_other"]
            rows = max(1, _PAIR_ELEMENTS // max(1, io.shape[1] * it.shape[1], it.shape[1] ** 2))
            for r in range(0, len(io), rows):
                a_i, a_v, b_i, b_v = io[r:r + rows], vo[r:r + rows], it[r:r + rows], vt[r:r + rows]
                _scatter(st["cross"], st["cross_codes"], (a_i[:, :, None] * n_other + b_i[:, None, :]).reshape(-1),
                         (a_v[:, :, None] * b_v[:, None, :]).reshape(-1))
                upper = b_i[:, :, None] <= b_i[:, None, :]  # each unordered pair once (diagonal included)
                lo = torch.minimum(b_i[:, :, None], b_i[:, None, :])
                hi = torch.maximum(b_i[:, :, None], b_i[:, None, :])
                _scatter(st["cc"], st["cc_codes"], (lo * n_other + hi)[upper], (b_v[:, :, None] * b_v[:, None, :])[upper])

    def r2(self, stats: dict, n_pick: int = N_PICK) -> dict:
        """side -> (targets, many-to-one R²); ``stats``: align's FeatureStats of both SAEs (Σf, Σf², n)."""
        return {side: (st["targets"], _greedy_r2(st, stats[side], stats["b" if side == "a" else "a"], n_pick))
                for side, st in self.sides.items()}


def _candidates_from_edges(edges: tuple, side: str, targets: np.ndarray, k: int) -> np.ndarray | None:
    """Each target's k best partners in the candidate graph (by similarity); None if some target has fewer."""
    ea, eb, sim = (np.asarray(e) for e in edges)
    own, other = (ea, eb) if side == "a" else (eb, ea)
    keep = np.isin(own, targets)
    own, other, sim = own[keep], other[keep], sim[keep]
    order = np.lexsort((-sim, own))
    own, other = own[order], other[order]
    starts = np.searchsorted(own, targets)
    counts = np.searchsorted(own, targets, side="right") - starts
    if (counts < k).any():
        return None
    return other[starts[:, None] + np.arange(k)[None, :]]


def _scatter(acc: Any, codes_sorted: Any, codes: Any, vals: Any) -> None:
    import torch

    keep = vals != 0
    codes, vals = codes[keep], vals[keep]
    if not len(codes) or not len(codes_sorted):
        return
    pos = torch.searchsorted(codes_sorted, codes).clamp(max=len(codes_sorted) - 1)
    hit = codes_sorted[pos] == codes
    acc.index_add_(0, pos[hit], vals[hit])


def _greedy_r2(st: dict, own: Any, other: Any, n_pick: int) -> np.ndarray:
    """Forward selection of ``n_pick`` of each target's candidates by OLS R² (with intercept)."""
    targets, cand, n_other = st["targets"], st["cand"], st["n_other"]
    T, K = cand.shape
    n = max(own.n, 1)
    s1o, s2o = np.asarray(own.sum)[targets], np.asarray(own.sumsq)[targets]
    s1c = np.asarray(other.sum)
    var_y = s2o / n - (s1o / n) ** 2
    cross_codes, cross = st["cross_codes"].numpy(), st["cross"].numpy()
    cc_codes, cc = st["cc_codes"].numpy(), st["cc"].numpy()

    def lookup(codes_sorted, vals, codes):
        pos = np.minimum(np.searchsorted(codes_sorted, codes), len(codes_sorted) - 1)
        return np.where(codes_sorted[pos] == codes, vals[pos], 0.0)

    sxy = lookup(cross_codes, cross, targets[:, None] * n_other + cand)                    # (T, K)
    cxy = sxy / n - (s1o / n)[:, None] * (s1c[cand] / n)
    lo, hi = np.minimum(cand[:, :, None], cand[:, None, :]), np.maximum(cand[:, :, None], cand[:, None, :])
    sxx = lookup(cc_codes, cc, lo * n_other + hi)                                           # (T, K, K)
    mc = s1c[cand] / n
    cxx = sxx / n - mc[:, :, None] * mc[:, None, :]
    # A tiny ridge keeps dead candidates and a candidate tried twice (it is then skipped) solvable.
    ridge = 1e-6 * np.trace(cxx, axis1=1, axis2=2) / K + 1e-12
    chosen = np.zeros((T, 0), np.int64)
    best = np.zeros(T)
    ar = np.arange(T)
    for _ in range(min(n_pick, K)):
        scores = np.full((T, K), -np.inf)
        for j in range(K):
            sel = np.concatenate([chosen, np.full((T, 1), j)], 1)
            A = cxx[ar[:, None, None], sel[:, :, None], sel[:, None, :]]
            b = cxy[ar[:, None], sel]
            A = A + ridge[:, None, None] * np.eye(sel.shape[1])
            w = np.linalg.solve(A, b[..., None])[..., 0]
            sc = (w * b).sum(1)
            taken = (chosen == j).any(1)
            scores[:, j] = np.where(taken, -np.inf, sc)
        pick = scores.argmax(1)
        best = scores[ar, pick]
        chosen = np.concatenate([chosen, pick[:, None]], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var_y > 1e-12, np.clip(best / var_y, 0.0, 1.0), np.nan)


class SeedSums:
    """Per-feature Σf of a second SAE of one model on the same tokens (the SAE-seed null; a StatAccumulator)."""

    def __init__(self, side: str, sae: Any, scale: float):
        import torch

        self.side, self.sae, self.scale = side, sae, scale
        self.sum = torch.zeros(sae.d_sae, dtype=torch.float64)
        self.rows = 0

    def update(self, xa: Any, xb: Any, fa: Any, fb: Any) -> None:
        import torch

        f = self.sae.encode(xa if self.side == "a" else xb, self.scale)
        self.sum += f.sum(0, dtype=torch.float64)
        self.rows += len(f)


def make_accumulators(store: Any, sae_a: Any, sae_b: Any, carried: np.ndarray, dirs_b: np.ndarray, split: str,
                      null_saes: dict | None = None) -> dict:
    """The calibration's streamed statistics for one align pass (align adds them to ``extra``)."""
    acc = {"probe": ProbeSums(store.d_model("a"), store.d_model("b"), sae_a.d_sae, sae_b.d_sae,
                              train_mask_fn(store, split)),
           "m2o": ManyToOneSums(carried, dirs_b)}
    import torch

    from .errors import DiffkitError

    for side, sae in (null_saes or {}).items():
        own = sae_a if side == "a" else sae_b
        if sae.W_dec.shape == own.W_dec.shape and torch.equal(sae.W_dec, own.W_dec):
            raise DiffkitError(f"--null-sae-{side} {sae.spec} is model {side.upper()}'s SAE itself: pass a second SAE "
                               "of that model (another training seed) for the SAE-seed null")
        acc[f"seed_{side}"] = SeedSums(side, sae, store.scale(side))
    return acc


# -- from statistics to calls ------------------------------------------------------------------------

def _seed_pairs(side: str, sae: Any, null: SeedSums, mean_act: np.ndarray, threshold: float):
    """Match the model's SAE with its seed SAE by decoder cosine (same space); return per feature the seed
    cosine and the centred act-mass log ratios of the matched seed pairs (the SAE-seed null of p_changed)."""
    from .matching import assign
    from .metrics import log_ratio

    dec, dec_s = sae.W_dec.double().numpy(), null.sae.W_dec.double().numpy()
    asg = assign(dec, dec_s, threshold)
    cos = np.full(sae.d_sae, np.nan)
    cos[asg.pair_a] = asg.similarity
    m = asg.matched
    ia, ib = asg.pair_a[m], asg.pair_b[m]
    mass = mean_act * np.linalg.norm(dec, axis=1)
    mass_s = null.sum.numpy() / max(1, null.rows) * np.linalg.norm(dec_s, axis=1)
    eps = 1e-3 * max(float(np.median(np.concatenate([mass, mass_s]))), 1e-12)
    lr = np.asarray(log_ratio(mass[ia], mass_s[ib], eps), np.float64)
    lr = lr - (np.median(lr) if len(lr) else 0.0)
    return cos, lr[(mass[ia] > 0) & (mass_s[ib] > 0)]


def _map_error_rows(table: Any, map_residual: dict | None) -> tuple[np.ndarray, str | None]:
    """Per row p of "the map fails where this feature fires" (:func:`map_error_p` on each side's
    ``map_err`` column; a shared pair: Bonferroni over its two sides), and the null's description;
    (NaNs, None) without the columns. A side whose map is exact (unexplained variance < MAP_EXACT: the
    same model twice) gets no test: its error is rounding, not a difference."""
    p = np.full(len(table), np.nan)
    if "map_err_a" not in table or "map_err_b" not in table:
        return p, None
    side_p, skipped = {}, []
    for side in ("a", "b"):
        resid = (map_residual or {}).get(side)
        if resid is not None and resid < MAP_EXACT:
            side_p[side] = np.full(len(table), np.nan)
            skipped.append(side.upper())
        else:  # a feature that never fired scores exactly 1 (the prior alone): no test, and not in the null's bulk
            col = table[f"map_err_{side}"].to_numpy(dtype=np.float64, copy=True)
            if f"freq_{side}" in table:
                col[~(table[f"freq_{side}"].to_numpy(dtype=np.float64) > 0)] = np.nan
            side_p[side] = map_error_p(col)
    pa, pb = side_p["a"], side_p["b"]
    p = np.where(np.isfinite(pa) & np.isfinite(pb), np.minimum(1.0, 2 * np.fmin(pa, pb)), np.fmin(pa, pb))
    note = ("model-free empirical null: log map_err over each SAE's live features ~ N(median, (1.4826 MAD)^2), "
            "one-sided; a shared pair 2 x its smaller p")
    if skipped:
        note += f"; no test for {' and '.join(skipped)} (the map is exact: the same model)"
    return p, note


def calibrate(table: Any, accs: dict, stats: dict, saes: tuple, threshold: float, fdr: float = DEFAULT_FDR,
              map_residual: dict | None = None) -> dict:
    """Add retention, many_to_one_r2, p/q columns and the verdict to ``table`` (in place); returns the summary part.
    ``map_residual``: {"a"|"b": the fitted map's unexplained variance fraction into that side}, for the map-error test."""
    probe: ProbeSums = accs["probe"]
    r2 = {(m, s): probe.r2(m, s) for m in ("a", "b") for s in ("a", "b")}
    ret = {}
    for s, o in (("a", "b"), ("b", "a")):
        own, other = r2[(s, s)], r2[(o, s)]
        with np.errstate(divide="ignore", invalid="ignore"):
            ret[s] = np.where(own >= R2_FLOOR, np.clip(other, 0.0, None) / own, np.nan)
    fa, fb = table.feature_a.to_numpy(), table.feature_b.to_numpy()
    has_a, has_b = fa >= 0, fb >= 0
    kind = table.kind.to_numpy()

    def per_row(values: dict) -> tuple[np.ndarray, np.ndarray]:
        va, vb = np.full(len(table), np.nan), np.full(len(table), np.nan)
        va[has_a], vb[has_b] = values["a"][fa[has_a]], values["b"][fb[has_b]]
        return va, vb

    (table["r2_own_a"], table["r2_own_b"]) = per_row({"a": r2[("a", "a")], "b": r2[("b", "b")]})
    (table["r2_other_a"], table["r2_other_b"]) = per_row({"a": r2[("b", "a")], "b": r2[("a", "b")]})
    ra, rb = per_row(ret)
    row_ret = np.where(kind == "a_only", ra, np.where(kind == "b_only", rb, np.fmin(ra, rb)))
    table["retention"] = row_ret
    m2o = np.full(len(table), np.nan)
    for side, (targets, values) in accs["m2o"].r2(stats).items():
        lookup = dict(zip(targets.tolist(), values.tolist()))
        col = fa if side == "a" else fb
        rows = np.nonzero(kind == f"{side}_only")[0]
        m2o[rows] = [lookup.get(int(col[i]), np.nan) for i in rows]
    table["many_to_one_r2"] = m2o
    # p_exclusive against the matched-pair null.
    shared = kind == "shared"
    ref = np.concatenate([ra[shared], rb[shared]])
    ref = ref[np.isfinite(ref)]
    p_ex = tailed_p_lower(row_ret, ref)
    unmatched = ~shared
    table["p_exclusive"] = p_ex
    table["q_exclusive"] = np.where(unmatched, 0.0, np.nan)
    table.loc[unmatched, "q_exclusive"] = benjamini_hochberg(p_ex[unmatched])
    # p_changed: SAE-seed null or the model-free empirical null.
    x = table.act_mass_log_ratio.to_numpy() if "act_mass_log_ratio" in table else np.full(len(table), np.nan)
    seed_null, seed_cos, seed_note = [], {}, []
    for side in ("a", "b"):
        null = accs.get(f"seed_{side}")
        if null is None:
            continue
        sae = saes[0] if side == "a" else saes[1]
        cos, lr = _seed_pairs(side, sae, null, stats[side].mean_act, threshold)
        seed_cos[side] = cos
        seed_null.append(lr)
        seed_note.append(f"{len(lr)} pairs of model {side.upper()}'s SAE and its seed SAE ({null.sae.spec})")
    p_ch = np.full(len(table), np.nan)
    cofire = shared & (table.pair_corr.to_numpy() >= MIN_PAIR_CORR)
    if seed_null:
        ref_ch = np.abs(np.concatenate(seed_null))
        p_ch[cofire] = empirical_p_upper(np.abs(x[cofire]), ref_ch)
        null_changed = "SAE-seed null: |centred act-mass log ratio| of " + " and ".join(seed_note)
    else:
        p_ch[cofire] = robust_t_p(x[cofire])
        null_changed = ("model-free empirical null (no --null-sae given): act_mass_log_ratio of the "
                        f"{int(cofire.sum())} co-firing shared pairs, (x - median) ~ s t_3, s from the MAD, two-sided")
    table["p_changed"] = p_ch
    table["q_changed"] = benjamini_hochberg(p_ch)
    p_map, null_map = _map_error_rows(table, map_residual)
    if null_map is not None:
        table["p_map_error"] = p_map
        table["q_map_error"] = benjamini_hochberg(p_map)
    for side, cos in seed_cos.items():
        sc = np.full(len(table), np.nan)
        col = fa if side == "a" else fb
        sc[col >= 0] = cos[col[col >= 0]]
        table[f"seed_cosine_{side}"] = sc
    verdict = np.where(shared, "shared", "unmatched").astype(object)
    q_ex = table.q_exclusive.to_numpy()
    for side in ("a", "b"):
        call = (kind == f"{side}_only") & (q_ex <= fdr)
        if side in seed_cos:
            call &= table[f"seed_cosine_{side}"].to_numpy() >= threshold
        verdict[call] = f"{side}_only"
    verdict[shared & (table.q_changed.to_numpy() <= fdr)] = "changed"
    n_map = 0
    if null_map is not None:
        by_map = np.isin(verdict, ("shared", "unmatched", "changed")) & (table.q_map_error.to_numpy() <= fdr)
        n_map = int(by_map.sum())
        verdict[by_map] = "changed"
    table["verdict"] = verdict
    n_un = {s: int((kind == f"{s}_only").sum()) for s in ("a", "b")}
    n_call = {s: int((verdict == f"{s}_only").sum()) for s in ("a", "b")}
    null_ex = (f"matched-pair null: retention of the {len(ref)} features in pairs matched at similarity >= "
               f"{threshold:g} (both sides); p = (1 + #{{ref <= retention}}) / (1 + N), exponential tail below its min")
    if seed_cos:
        null_ex += "; an exclusive call also needs a seed-SAE partner at cosine >= the threshold"
    return {
        "fdr": fdr,
        "calls": {"a_only": n_call["a"], "b_only": n_call["b"], "changed": int((verdict == "changed").sum()),
                  "unmatched_a": n_un["a"], "unmatched_b": n_un["b"], "shared": int(shared.sum())},
        "changed_by_map_error": n_map,
        "null_exclusive": null_ex, "null_changed": null_changed, "null_map_error": null_map,
        "heldout_probe": "heldout" in probe.parts,
        "r2_own_median": {s: float(np.nanmedian(r2[(s, s)])) if np.isfinite(r2[(s, s)]).any() else float("nan")
                          for s in ("a", "b")},
        "sentence": calibrated_sentence(n_call, n_un, fdr, null_ex),
    }


def calibrated_sentence(n_call: dict, n_un: dict, fdr: float, null: str) -> str:
    return (f"{n_call['a']} A-only at FDR {100 * fdr:g}% (of {n_un['a']} unmatched), {n_call['b']} B-only "
            f"(of {n_un['b']} unmatched); null: {null.split(':')[0]}")


def call_features(table: Any, side: str) -> np.ndarray:
    """Features of ``side`` that the calibrated verdict calls exclusive."""
    rows = table[table.verdict == f"{side}_only"] if "verdict" in table else table.iloc[:0]
    return rows[f"feature_{side}"].to_numpy()


__all__: Sequence[str] = ("benjamini_hochberg", "empirical_p_lower", "tailed_p_lower", "empirical_p_upper", "robust_t_p",
                          "ProbeSums", "ManyToOneSums", "SeedSums", "calibrate", "make_accumulators", "probe_r2")
