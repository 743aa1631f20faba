"""The training-free diff: activation store + linear map + two SAEs -> FeatureDiff.

Steps (:func:`align`): check both SAEs against the store (width, hook, finite weights); carry A's
decoder directions into B's space through the linear part of the A→B map; optimal one-to-one
assignment (:mod:`diffkit.matching`); pairs below the similarity threshold become unmatched
(A-only / B-only); one pass over the store's tokens encoding A's activations with A's SAE and B's
with B's (same tokens) for per-feature statistics and the pair correlations. (With a correlation
cost the pass comes first, since the assignment needs the full cross sums.)

Table columns (``features.parquet`` / ``features.csv``; one row per matched pair or unmatched feature):

=====================  ===========================================================================
kind                   ``shared`` (matched pair), ``a_only``, ``b_only``
feature_a, feature_b   SAE latent index in A / B (−1 where the row has no such side)
similarity             similarity of the pair the assignment made (for unmatched rows: with the
                       partner it was assigned and rejected, NaN if it got none): cosine, or the
                       blend with activation correlation when ``cost`` is ``corr``/``blend``
cosine                 cos(W_dec_A[a] @ W_ab, W_dec_B[b]) for that pair
enc_norm_a, _b         ‖effective encoder column‖ (for sae-lens TopK SAEs with
                       ``rescale_acts_by_decoder_norm``, ‖W_enc[:, i]‖·‖W_dec[i]‖, the functional
                       that actually produces the pre-activation)
enc_norm_diff          enc_norm_a − enc_norm_b (the original method's score, signed; its |·| ranks)
enc_norm_diff_robust   enc_norm_a / robust_a − enc_norm_b / robust_b, robust = median over that
                       SAE's features (not the max: one outlier rescaled everything, failure 4)
freq_a, freq_b         fraction of the store's tokens on which the feature is > 0
mean_act_a, _b         mean activation over all tokens (activation mass per token)
freq_log_ratio         log((freq_a + ε) / (freq_b + ε)), ε = 1 / n_tokens
mean_act_log_ratio     log((mean_act_a + ε) / (mean_act_b + ε)), ε = 1e-3 · median mean_act of both SAEs
act_mass_log_ratio     log((m_a + ε) / (m_b + ε)) − its median over the shared pairs, m = mean_act · ‖W_dec
                       row‖ (the feature's mean contribution to the activation, in that model's
                       units; ε = 1e-3 · median m of both SAEs). Centred: a scale shared by every pair
                       (the two SAEs' or models' overall norms) is not a feature difference
pair_corr              Pearson correlation over tokens of the two features' activations
score                  the ``rank_by`` difference score (higher = more different); unmatched rows:
                       their activation mass (mean_act)
rank                   1 = most different, within each kind
r2_own_a, _b           held-out R² of an affine ridge probe predicting the feature's activation from
                       its own model's raw residual (train split fit; :mod:`diffkit.calibrate`)
r2_other_a, _b         the same probe from the *other* model's residual
retention              r2_other / r2_own of the row's feature (shared rows: the lower of the two
                       sides; NaN when r2_own < 0.05): ≈ 1 the other model carries it, ≈ 0 it does not.
                       Large SAEs (probe sums > 1.5 GiB or solves > 1e11 FLOP, e.g. 16k × d 1024):
                       only the unmatched features and a seeded 4096 of the matched ones per side
many_to_one_r2         unmatched rows: R² of the feature's activation on the best 4 of the other
                       SAE's features (greedy, among its 32 nearest by carried decoder cosine)
p_exclusive            empirical p of the row's retention under the matched-pair null (calibrate)
q_exclusive            Benjamini–Hochberg q of p_exclusive over the unmatched rows (NaN for shared)
p_changed, q_changed   shared rows with pair_corr ≥ 0.5: p of |act_mass_log_ratio| under the SAE-seed
                       null (``--null-sae-a/-b``) or the model-free empirical null; BH q over them
seed_cosine_a, _b      with a seed SAE: decoder cosine of the feature's assigned seed-SAE partner
verdict                ``a_only`` / ``b_only``: unmatched and q_exclusive ≤ fdr (and reproduced by
                       the seed SAE when one is given); ``unmatched``: no partner, but no model-level
                       evidence at the FDR; ``changed``: shared and q_changed ≤ fdr; else ``shared``
=====================  ===========================================================================

Calibrated verdict (``verdict``; ``--fdr``, default 0.1; :mod:`diffkit.calibrate` has the nulls).
Why retention decides and many-to-one does not, measured on ``diffkit bench groundtruth``'s planted
pairs (live unmatched SAE-A features; one run, 1 thread; the work folder's main case and seed-pair
control):

===============================  ==================  =====================  ======================
case                             unmatched (live)    retention q ≤ 0.1      many-to-one R² < 0.25
===============================  ==================  =====================  ======================
seed-pair control (none planted)  126                 0                      126
main case (32 A-only planted)     157                 31 (all 31 recovered   157
                                                      planted A-only, no
                                                      other)
===============================  ==================  =====================  ======================

A junk latent of one SAE is reproduced by nothing in the other SAE whatever the models share, so
the SAE-level fit cannot tell it from a feature the other model lacks; the other model's residual
can (planted exclusive: retention ≤ 0.02; matched features: median 0.89). On the control, 117 of
the 126 are junk latents that their own residual cannot predict either (r2_own < 0.05: never
called); the other 9 have retention ≈ 1. A nonlinear probe (an MLP, 512 hidden, on the same
split) raises the own-residual R² (median 0.19 → 0.60) but separates no better (AUROC 1.0 either
way; log1p(f) the same; the linear pre-activation worse, 0.999 with 4 of 31 below 0.5), and the
linear probe is the one a single streamed pass gives in closed form, so retention is linear.
``kind`` keeps its old meaning (the assignment's call at the threshold); ``verdict`` is the
calibrated one.

Rank-by methods (:data:`RANKINGS`): ``act-mass`` |act_mass_log_ratio| (default); ``enc-norm``
|enc_norm_diff|; ``enc-norm-robust`` |enc_norm_diff_robust|; ``freq`` |freq_log_ratio|;
``mean-act`` |mean_act_log_ratio|; ``corr`` 1 − pair_corr; ``map-error`` the map's error where the
feature fires (:mod:`diffkit.divergence`; columns ``map_err_a``/``map_err_b``; every row, unmatched
ones included, is scored by it, a shared pair by the larger of its two sides).

Why ``act-mass`` is the default: on planted ground truth with real sae-lens TopK SAEs (``diffkit
bench groundtruth``), shared features whose strength was changed in B are found by the centred
activation ratio with AUROC 1.0, and by the encoder-norm difference — the original method's
score — with AUROC 0.48, i.e. not at all: a TopK SAE need not put a feature's strength into its
encoder norm. The decoder norm enters because an SAE may trade a feature's activation scale
against its decoder norm (sae-lens TopK SAEs keep decoder rows at norm 1; others need not).

Default threshold (:data:`DEFAULT_THRESHOLD` = 0.5), chosen on the seed-pair control. Run:
zoo:base vs zoo:base-seed1 (same data and recipe, another seed), their zoo SAEs (1024 latents,
d = 128), a 100k-token ``mixed`` store, lstsq map (held-out FVE 0.58 / 0.59), cosine cost. Null:
the same problem with A's carried directions turned by a random orthogonal matrix before the
assignment, so that no assigned pair is real (5 rotations). Estimated false-discovery rate at
threshold t = (mean null pairs with similarity ≥ t) / (observed pairs ≥ t):

====  ============  ==========  =====
t     seed pairs    null pairs  FDR
====  ============  ==========  =====
0.35  736           21.2        2.9%
0.40  529           1.2         0.2%
0.45  317           0.0         0
0.50  191           0.0         0
====  ============  ==========  =====

The largest null similarity over the 5 rotations was 0.447, so 0.5 is the first 0.05 step above
every chance pair: a pair called shared at the default is not a coincidence of high-dimensional
geometry. (base vs finetuned under the same null: max 0.409; 538 pairs ≥ 0.5.) The chance level
falls as d grows (≈ 3.5/sqrt(d) for 1024 candidates), so on wide models 0.5 is conservative;
``summary.json`` lists the counts at 0.3…0.9 so another cut needs no rerun.

What the seed pair is *not*, on this zoo: a floor that a fine-tune exceeds. base-seed1 is a
separately trained network, and it differs from base more than the 400-step fine-tune does on
every score (map FVE 0.58 vs 0.89; 191 vs 538 pairs ≥ 0.5; median pair correlation 0.39 vs 0.60).
The "30–53% shared" noise floor of the literature is for SAEs of the *same* model with different
seeds: the zoo has that pair too (``zoo:base`` vs ``zoo:base@seed1`` on a base-vs-base store; 100k
tokens: 570 shared, 454 unmatched each side, against 538 / 486 for the fine-tune), and it is the
floor to read a diff against (``diffkit demo`` reports all three). ``tests/test_align.py`` pins
these facts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .codes import Codes, FeatureTally
from .errors import DiffkitError
from .matching import Assignment, assign, unit_rows
from .metrics import log_ratio, robust_scale

DIFF_KIND = "diffkit.FeatureDiff"
DIFF_FORMAT_VERSION = 2  # 2: config.json sealed (diffkit.io), sha256 of every file of the artifact
DEFAULT_THRESHOLD = 0.5
RANKINGS = ("act-mass", "enc-norm-robust", "enc-norm", "freq", "mean-act", "corr", "map-error")
COSTS = ("cosine", "corr", "blend")
SPLITS = ("all", "train", "heldout")
# The statistics pass holds a few (rows, d_sae) feature matrices at once (each SAE's encoding, its
# float64 copies for the sums): rows per batch are capped so one matrix stays near 2^26 elements
# (256 MiB in float32). At 65,536 features a 4096-row batch made the pass peak at 13 GiB.
STAT_PASS_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class AlignConfig:
    """Options of an alignment (saved as ``config.json`` beside the table)."""

    threshold: float = DEFAULT_THRESHOLD
    cost: str = "cosine"
    blend: float = 0.5
    solver: str = "auto"
    k: int = 32
    rank_by: str = "act-mass"
    split: str = "all"
    batch_size: int = 4096
    n_contexts: int = 3
    device: str = "cpu"
    fdr: float = 0.1          # false-discovery rate of the calibrated verdict (diffkit.calibrate)
    calibrate: bool = True    # model-level statistics, p/q-values and the verdict ride on the one pass

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise DiffkitError(f"--threshold is a similarity in [-1, 1], got {self.threshold}")
        if self.cost not in COSTS:
            raise DiffkitError(f"unknown --cost {self.cost!r}: use one of {', '.join(COSTS)}")
        if self.rank_by not in RANKINGS:
            raise DiffkitError(f"unknown --rank-by {self.rank_by!r}: use one of {', '.join(RANKINGS)}")
        if self.split not in SPLITS:
            raise DiffkitError(f"unknown --split {self.split!r}: use one of {', '.join(SPLITS)}")
        if not 0 < self.fdr < 1:
            raise DiffkitError(f"--fdr is a false-discovery rate in (0, 1), got {self.fdr}")
        if self.k < 1 or self.batch_size < 1 or self.n_contexts < 0:
            raise DiffkitError("--k and --batch-size must be positive and --contexts non-negative")


@dataclass
class FeatureStats:
    """Per-feature statistics of one SAE over the store's tokens, plus its top-activating token rows."""

    freq: np.ndarray
    mean_act: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray
    top_rows: np.ndarray  # (n_features, m) split-relative row indices, best first (−1: fewer firings)
    n: int


@dataclass
class FeatureDiff:
    """The result: the table, the assignment, and what the summary reports."""

    table: Any  # pandas.DataFrame
    assignment: Assignment
    summary: dict
    config: AlignConfig
    contexts: dict  # ("a"|"b", feature) -> list of (text, marked token offset)


# The difference score of a shared pair under each rank-by (map-error: added by diffkit.divergence's columns).
SHARED_SCORES: dict[str, Callable[[Any], Any]] = {
    "act-mass": lambda t: t.act_mass_log_ratio.abs(), "enc-norm": lambda t: t.enc_norm_diff.abs(),
    "enc-norm-robust": lambda t: t.enc_norm_diff_robust.abs(), "freq": lambda t: t.freq_log_ratio.abs(),
    "mean-act": lambda t: t.mean_act_log_ratio.abs(), "corr": lambda t: 1.0 - t.pair_corr}


def decoder_norms(sae: Any) -> np.ndarray:
    return sae.W_dec.norm(dim=1).double().numpy()


def effective_encoder_norms(sae: Any) -> np.ndarray:
    norms = sae.W_enc.norm(dim=0)
    if getattr(sae.sae.cfg, "rescale_acts_by_decoder_norm", False):
        norms = norms * sae.W_dec.norm(dim=1)
    return norms.double().numpy()


class StatAccumulator(Protocol):
    """A streamed statistic that rides on align's one pass over the store (no second read of the tokens).

    ``update`` sees each batch once: the raw (unscaled) activations of both models and both SAEs'
    feature activations on them as :class:`diffkit.codes.Codes` (dense, and their nonzero entries
    found once for every statistic); whatever it keeps must be bounded by features × width, never tokens.
    """

    def update(self, xa: Any, xb: Any, fa: Codes, fb: Codes) -> None: ...


def _stat_pass(store: Any, sae_a: Any, sae_b: Any, cfg: AlignConfig, cross: bool, pairs: tuple | None,
               progress: bool, extra: Sequence[StatAccumulator] = ()) -> dict:
    """One pass over the split: per-feature sums, top rows, optionally Σ f_aᵀ f_b (full or for pairs),
    and each of ``extra``'s own sums. Every per-feature sum scatters the codes' nonzero entries."""
    import torch
    from .progress import tqdm

    n_a, n_b = sae_a.d_sae, sae_b.d_sae
    scale_a, scale_b = store.scale("a"), store.scale("b")
    tally = {"a": FeatureTally(n_a, cfg.n_contexts), "b": FeatureTally(n_b, cfg.n_contexts)}
    full = torch.zeros(n_a, n_b, dtype=torch.float64) if cross else None
    pair_sum = torch.zeros(len(pairs[0]), dtype=torch.float64) if pairs is not None else None
    if pairs is not None:
        pair_of_a = torch.full((n_a,), -1, dtype=torch.int64)  # A feature -> its pair's index
        pair_of_a[torch.from_numpy(pairs[0])] = torch.arange(len(pairs[0]))
        pb = torch.from_numpy(pairs[1])
    row0, n = 0, store.n_tokens(cfg.split)
    rows_per_batch = min(cfg.batch_size, max(256, STAT_PASS_ELEMENTS // max(n_a, n_b)))
    batches = store.iter_batches(rows_per_batch, split=cfg.split, shuffle=False, drop_last=False, normalized=False)
    for xa, xb in tqdm(batches, total=-(-n // rows_per_batch), desc="encode", unit="batch", disable=not progress):
        fa, fb = Codes(sae_a.encode(xa, scale_a)), Codes(sae_b.encode(xb, scale_b))
        tally["a"].add(fa)
        tally["b"].add(fb)
        if full is not None:
            full += fa.dense.double().T @ fb.dense.double()
        if pair_sum is not None:
            row, col, val = fa.entries()
            i = pair_of_a[col]
            hit = i >= 0
            pair_sum.index_add_(0, i[hit], val[hit] * fb.dense[row[hit], pb[i[hit]]].double())
        for acc_extra in extra:
            acc_extra.update(xa, xb, fa, fb)
        row0 += len(fa)
    out = {"n": row0, "full": full, "pair_sum": pair_sum}
    for s, t in tally.items():
        out[s] = FeatureStats(freq=(t.count.double() / max(1, row0)).numpy(), mean_act=(t.sum / max(1, row0)).numpy(),
                              sum=t.sum.numpy(), sumsq=t.sumsq.numpy(), top_rows=t.examples().numpy(), n=row0)
    return out


def correlation(cross_sum: np.ndarray, a: FeatureStats, b: FeatureStats, ia: Any = slice(None),
                ib: Any = slice(None)) -> np.ndarray:
    """Pearson r from sums: (nΣab − ΣaΣb) / sqrt((nΣa² − (Σa)²)(nΣb² − (Σb)²)); 0 where a side is constant."""
    n = a.n
    sa, sb = a.sum[ia], b.sum[ib]
    va = np.maximum(n * a.sumsq[ia] - sa ** 2, 0.0)
    vb = np.maximum(n * b.sumsq[ib] - sb ** 2, 0.0)
    if np.ndim(cross_sum) == 2:
        num = n * cross_sum - np.outer(sa, sb)
        den = np.sqrt(np.outer(va, vb))
    else:
        num = n * cross_sum - sa * sb
        den = np.sqrt(va * vb)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _table(asg: Assignment, stats: dict, pair_corr: np.ndarray, cosines: np.ndarray, enc_a: np.ndarray,
           enc_b: np.ndarray, dec_a: np.ndarray, dec_b: np.ndarray, rank_by: str) -> Any:
    import pandas as pd

    sa, sb = stats["a"], stats["b"]
    matched = asg.matched
    ia, ib = asg.pair_a[matched], asg.pair_b[matched]
    eps_f = 1.0 / max(1, sa.n)
    eps_m = 1e-3 * max(float(np.median(np.concatenate([sa.mean_act, sb.mean_act]))), 1e-12)
    rob_a, rob_b = robust_scale(enc_a), robust_scale(enc_b)
    shared = pd.DataFrame({
        "kind": "shared", "feature_a": ia, "feature_b": ib, "similarity": asg.similarity[matched],
        "cosine": cosines[matched], "enc_norm_a": enc_a[ia], "enc_norm_b": enc_b[ib]})
    shared["enc_norm_diff"] = shared.enc_norm_a - shared.enc_norm_b
    shared["enc_norm_diff_robust"] = shared.enc_norm_a / rob_a - shared.enc_norm_b / rob_b
    shared["freq_a"], shared["freq_b"] = sa.freq[ia], sb.freq[ib]
    shared["mean_act_a"], shared["mean_act_b"] = sa.mean_act[ia], sb.mean_act[ib]
    shared["freq_log_ratio"] = log_ratio(shared.freq_a, shared.freq_b, eps_f)
    shared["mean_act_log_ratio"] = log_ratio(shared.mean_act_a, shared.mean_act_b, eps_m)
    mass_a, mass_b = sa.mean_act * dec_a, sb.mean_act * dec_b
    eps_mass = 1e-3 * max(float(np.median(np.concatenate([mass_a, mass_b]))), 1e-12)
    mass_ratio = np.asarray(log_ratio(mass_a[ia], mass_b[ib], eps_mass), dtype=np.float64)
    shared["act_mass_log_ratio"] = mass_ratio - (np.median(mass_ratio) if len(mass_ratio) else 0.0)
    shared["pair_corr"] = pair_corr[matched]
    shared["score"] = SHARED_SCORES[rank_by](shared)
    partner_a = {int(a): (int(b), float(s), float(c)) for a, b, s, c in
                 zip(asg.pair_a, asg.pair_b, asg.similarity, cosines)}
    partner_b = {b: (a, s, c) for a, (b, s, c) in partner_a.items()}
    parts = [shared]
    for side, only, enc, st, partner in (("a", asg.a_only, enc_a, sa, partner_a), ("b", asg.b_only, enc_b, sb, partner_b)):
        got = [partner.get(int(i), (-1, np.nan, np.nan)) for i in only]
        df = pd.DataFrame({"kind": f"{side}_only",
                           "feature_a": only if side == "a" else -1, "feature_b": only if side == "b" else -1,
                           "similarity": [g[1] for g in got], "cosine": [g[2] for g in got],
                           f"enc_norm_{side}": enc[only], f"freq_{side}": st.freq[only],
                           f"mean_act_{side}": st.mean_act[only]})
        df["score"] = df[f"mean_act_{side}"]
        parts.append(df)
    table = pd.concat(parts, ignore_index=True)
    table["feature_a"] = table.feature_a.astype(np.int64)
    table["feature_b"] = table.feature_b.astype(np.int64)
    order = {"a_only": 0, "b_only": 1, "shared": 2}
    table = table.sort_values(["kind", "score"], key=lambda c: c.map(order) if c.name == "kind" else -c,
                              kind="stable").reset_index(drop=True)
    table["rank"] = table.groupby("kind").cumcount() + 1
    return table


def decode_contexts(store: Any, rows: np.ndarray, split: str, tokenizer: Any, window: int = 12) -> list[str]:
    """The text around each of ``rows`` (positions of ``split``; −1 = none), the position's token marked ``[[·]]``."""
    rows = rows[rows >= 0]
    if len(rows) == 0:
        return []
    out = []
    for ids, off in store.contexts(rows, split=split, window=window):
        left, tok, right = (tokenizer.decode(ids[:off]), tokenizer.decode(ids[off:off + 1]),
                            tokenizer.decode(ids[off + 1:]))
        out.append((left + "[[" + tok + "]]" + right).replace("\n", "⏎"))
    return out


def store_tokenizer(store: Any) -> Any:
    """The tokenizer that decodes the store's token ids: the zoo's byte tokenizer or model A's own."""
    from .tokenizer import ByteTokenizer

    spec = str(store.manifest["sources"]["a"].get("spec", ""))
    tok = store.manifest["sources"]["a"].get("tokenizer")
    byte_zoo = spec.startswith(("zoo:", "planted:")) and spec != "zoo:smollm2"  # zoo:smollm2 has its own tokenizer
    if byte_zoo or tok in (None, ByteTokenizer.name) or "byte" in str(tok):
        return ByteTokenizer()
    try:
        from .models import load_model

        return load_model(spec).tokenizer
    except Exception:  # contexts are a courtesy: fall back to bytes rather than fail the diff
        return ByteTokenizer()


def align(store: Any, sae_a: Any, sae_b: Any, lmap: Any, cfg: AlignConfig = AlignConfig(), progress: bool = False,
          log: Callable[[str], None] = lambda _: None, extra: Sequence[StatAccumulator] = (),
          null_saes: dict | None = None) -> FeatureDiff:
    """Run the training-free diff (module docstring); SAEs are :class:`~diffkit.saes.LoadedSAE`.

    ``extra`` statistics are updated in the same pass over the store as align's own (one with a
    ``prepare(a_targets, b_targets, assignment)`` method is told the unmatched features before the pass).
    ``null_saes``: {"a"|"b": a second LoadedSAE of that model}, the SAE-seed null of :mod:`diffkit.calibrate`."""
    from .saes import check_against_store

    t0 = time.perf_counter()
    notes = check_against_store(sae_a, store, "a") + check_against_store(sae_b, store, "b")
    if (lmap.d_a_, lmap.d_b_) != (store.d_model("a"), store.d_model("b")):
        raise DiffkitError(f"the map was fitted for widths {lmap.d_a_} -> {lmap.d_b_}, the store has "
                           f"{store.d_model('a')} -> {store.d_model('b')}: fit the map on this store")
    if store.n_tokens(cfg.split) == 0:
        raise DiffkitError(f"the store has no tokens in split {cfg.split!r}: use --split all or collect more tokens")
    if cfg.rank_by == "map-error" and not any(hasattr(e, "feature_columns") for e in extra):
        from .divergence import Divergence, split_positions  # the map-error sums ride on this pass

        extra = [*extra, Divergence(lmap, store.n_tokens(cfg.split), split_positions(store, cfg.split),
                                    int(store.config.ctx), sae_a.W_dec, sae_b.W_dec)]
    carried = lmap.carry_directions(sae_a.W_dec.double().numpy())
    dirs_b = sae_b.W_dec.float().numpy()  # every use normalizes it in float32: no float64 copy (1.2 GB at 65k × 2304)
    need_cross = cfg.cost != "cosine"
    cal = {}
    if cfg.calibrate:
        from .calibrate import make_accumulators

        cal = make_accumulators(store, sae_a, sae_b, carried, dirs_b, cfg.split, null_saes)
        extra = [*extra, *cal.values()]
    if need_cross and sae_a.d_sae * sae_b.d_sae > 1 << 27:
        raise DiffkitError(f"--cost {cfg.cost} needs the full {sae_a.d_sae}×{sae_b.d_sae} correlation matrix: too "
                           "large; use --cost cosine for SAEs this size")
    # One pass over the store either way: a correlation cost needs the full cross sums before the
    # assignment; a cosine cost needs none, so the pass runs after it and sums only the pairs.
    if need_cross:
        _prepare(extra, np.arange(sae_a.d_sae), np.arange(sae_b.d_sae), None)  # no assignment yet: every feature
        stats = _stat_pass(store, sae_a, sae_b, cfg, cross=True, pairs=None, progress=progress, extra=extra)
        t_stats = time.perf_counter()
        corr = correlation(stats["full"].numpy(), stats["a"], stats["b"])
        asg = assign(carried, dirs_b, cfg.threshold, solver=cfg.solver, k=cfg.k, extra_similarity=corr,
                     blend=1.0 if cfg.cost == "corr" else cfg.blend, device=cfg.device, progress=progress)
        t_assign = time.perf_counter()
        _check_some_match(asg, cfg, sae_a, sae_b)
        pair_corr = corr[asg.pair_a, asg.pair_b]
    else:
        asg = assign(carried, dirs_b, cfg.threshold, solver=cfg.solver, k=cfg.k, device=cfg.device,
                     progress=progress)
        t_assign = time.perf_counter()
        _check_some_match(asg, cfg, sae_a, sae_b)
        _prepare(extra, asg.a_only, asg.b_only, asg)
        stats = _stat_pass(store, sae_a, sae_b, cfg, cross=False, pairs=(asg.pair_a, asg.pair_b), progress=progress,
                           extra=extra)
        t_stats = time.perf_counter()
        pair_corr = correlation(stats["pair_sum"].numpy(), stats["a"], stats["b"], asg.pair_a, asg.pair_b)
    cosines = _pair_cosines(carried, dirs_b, asg.pair_a, asg.pair_b)
    table = _table(asg, stats, pair_corr, cosines, effective_encoder_norms(sae_a), effective_encoder_norms(sae_b),
                   decoder_norms(sae_a), decoder_norms(sae_b), "act-mass" if cfg.rank_by == "map-error" else cfg.rank_by)
    for acc in extra:
        if hasattr(acc, "feature_columns"):  # diffkit.divergence: map_err_a/_b columns (and the map-error rank)
            table = acc.feature_columns(table, rank=cfg.rank_by == "map-error")
    summary = _summary(asg, lmap, stats, cfg, notes, table, pair_corr,
                       {"stats": (t_stats - t0) if need_cross else (t_stats - t_assign),
                        "assign": (t_assign - t_stats) if need_cross else (t_assign - t0),
                        "total": time.perf_counter() - t0})
    if cal:
        from .calibrate import calibrate

        t_cal = time.perf_counter()
        summary["calibration"] = calibrate(table, cal, stats, (sae_a, sae_b), cfg.threshold, cfg.fdr,
                                           map_residual=_map_residual(lmap))
        summary["seconds"]["calibrate"] = time.perf_counter() - t_cal
        summary["seconds"]["total"] = time.perf_counter() - t0
    contexts = {}
    if cfg.n_contexts:
        tok = store_tokenizer(store)
        for side in ("a", "b"):
            for i in _top_features(table, side, 5):
                contexts[(side, i)] = decode_contexts(store, stats[side].top_rows[i], cfg.split, tok)
    return FeatureDiff(table, asg, summary, cfg, contexts)


def _pair_cosines(dirs_a: np.ndarray, dirs_b: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                  chunk: int = 8192) -> np.ndarray:
    """cos(dirs_a[ia[i]], dirs_b[ib[i]]) in float32, ``chunk`` pairs at a time (no gathered copy of every row)."""
    out = np.empty(len(ia), np.float32)
    for lo in range(0, len(ia), chunk):
        sl = slice(lo, lo + chunk)
        out[sl] = (unit_rows(dirs_a[ia[sl]]) * unit_rows(dirs_b[ib[sl]])).sum(1).numpy()
    return out


def _prepare(extra: Sequence[StatAccumulator], a_targets: np.ndarray, b_targets: np.ndarray, asg: Any) -> None:
    for acc in extra:
        if hasattr(acc, "prepare"):
            acc.prepare(np.asarray(a_targets), np.asarray(b_targets), asg)


def _map_residual(lmap: Any) -> dict:
    """{"b": 1 − FVE of A→B, "a": 1 − FVE of B→A}, held-out where the fit had held-out tokens."""
    out = {}
    for side, name in (("b", "a_to_b"), ("a", "b_to_a")):
        sc = getattr(lmap, "scores_", {}).get(name, {})
        fve = sc.get("heldout_fve") if sc.get("heldout_fve") is not None else sc.get("train_fve")
        if fve is not None and np.isfinite(fve):
            out[side] = 1.0 - float(fve)
    return out


def _check_some_match(asg: Assignment, cfg: AlignConfig, sae_a: Any, sae_b: Any) -> None:
    if not asg.matched.any():
        raise DiffkitError(f"no feature pair reaches similarity {cfg.threshold} (best assigned pair: "
                           f"{float(asg.similarity.max()):.3f}; SAE sizes {sae_a.d_sae} and {sae_b.d_sae}): these SAEs "
                           "share nothing at this threshold; check that they belong to the store's models and hooks, "
                           "or lower --threshold")


def _top_features(table: Any, side: str, n: int) -> list[int]:
    only = table[table.kind == f"{side}_only"].head(n)[f"feature_{side}"].tolist()
    if "verdict" in table:  # the calibrated calls are listed first in the summary and the reports
        called = table[table.verdict == f"{side}_only"].sort_values("q_exclusive", kind="stable")
        only = list(dict.fromkeys(called.head(n)[f"feature_{side}"].tolist() + only))
    shared = table[table.kind == "shared"]
    lean = shared.enc_norm_diff_robust > 0 if side == "a" else shared.enc_norm_diff_robust < 0
    return only + shared[lean].head(n)[f"feature_{side}"].tolist()


def _summary(asg: Assignment, lmap: Any, stats: dict, cfg: AlignConfig, notes: list[str], table: Any,
             pair_corr: np.ndarray, seconds: dict) -> dict:
    sim = asg.similarity.astype(np.float64)
    qs = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99]
    at = {}
    for t in sorted({0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, cfg.threshold}):
        m = int((sim >= t).sum())
        at[f"{t:g}"] = {"shared": m, "a_only": asg.n_a - m, "b_only": asg.n_b - m}
    hist, edges = np.histogram(sim, bins=20, range=(-1.0, 1.0))
    shared = table[table.kind == "shared"]
    return {
        "threshold": cfg.threshold, "n_a": asg.n_a, "n_b": asg.n_b,
        "counts": {"shared": int(len(shared)), "a_only": int((table.kind == "a_only").sum()),
                   "b_only": int((table.kind == "b_only").sum())},
        "counts_at_thresholds": at,
        "similarity_quantiles": {f"{q:g}": float(np.quantile(sim, q)) for q in qs},
        "similarity_mean": float(sim.mean()),
        "similarity_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        "total_cost": asg.total_cost, "solver": asg.solver, "k": asg.k,
        "map": {"method": lmap.method, "space": lmap.space, "scores": {d: {k: v for k, v in s.items()
                                                                         if k != "heldout_fve_per_dim"}
                                                                     for d, s in lmap.scores_.items()}},
        "score_medians_shared": {c: float(shared[c].abs().median()) if len(shared) else float("nan")
                                 for c in ("act_mass_log_ratio", "enc_norm_diff", "enc_norm_diff_robust",
                                           "freq_log_ratio", "mean_act_log_ratio")},
        "pair_corr_median_shared": float(np.median(pair_corr[asg.matched])) if asg.matched.any() else float("nan"),
        "tokens": stats["a"].n, "split": cfg.split, "rank_by": cfg.rank_by, "notes": notes, "seconds": seconds,
        "dead": {"a": int((stats["a"].freq == 0).sum()), "b": int((stats["b"].freq == 0).sum())},
        "similarity_definition": "1 - cost of the assignment: cosine of A's decoder direction carried by the map's "
                                 "linear part vs B's decoder direction" + (
                                     "" if cfg.cost == "cosine" else f", blended ({cfg.cost}, blend {cfg.blend}) with "
                                     "the Pearson correlation of the two features' activations"),
    }


def save_diff(diff: FeatureDiff, out: str | Path, inputs: dict) -> Path:
    """Write features.parquet, features.csv, summary.json, contexts.json, then config.json (marks it complete)."""
    import io

    from .io import atomic_write_bytes, json_bytes, sha256_bytes, write_sealed_json

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffkitError(f"--out {out} is a file: pass a directory path")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists():
        (out / "config.json").unlink()
    buf = io.BytesIO()
    diff.table.to_parquet(buf, index=False)
    files = {"features.parquet": buf.getvalue(), "features.csv": diff.table.to_csv(index=False).encode(),
             "summary.json": json_bytes(diff.summary),
             "contexts.json": json_bytes([{"side": s, "feature": int(i), "contexts": c}
                                          for (s, i), c in diff.contexts.items()])}
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    write_sealed_json(out / "config.json", {"kind": DIFF_KIND, "format_version": DIFF_FORMAT_VERSION,
                                            "config": asdict(diff.config), "inputs": inputs,
                                            "sha256": {name: sha256_bytes(data) for name, data in files.items()}})
    return out


def load_diff_meta(out: str | Path) -> dict:
    """A saved FeatureDiff's config.json, seal checked (its ``sha256`` vouches for every other file)."""
    from .io import read_sealed_json

    out = Path(out)
    fix = f"run `diffkit align --out {out}` again"
    if not (out / "config.json").exists():
        raise DiffkitError(f"{out} is not a complete FeatureDiff (no config.json): run `diffkit align --out {out}`")
    meta = read_sealed_json(out / "config.json", DIFF_KIND, DIFF_FORMAT_VERSION, fix)
    if not isinstance(meta.get("sha256"), dict):
        raise DiffkitError(f"{out / 'config.json'}: sha256 is not an object: {fix}")
    return meta


def load_diff_json(out: str | Path, name: str) -> Any:
    """``summary.json`` or ``contexts.json`` of a saved FeatureDiff, checked against its recorded sha256."""
    from .io import read_json, verify_sha256

    out = Path(out)
    fix = f"run `diffkit align --out {out}` again"
    verify_sha256(out / name, load_diff_meta(out)["sha256"].get(name), fix)
    return read_json(out / name, fix)


def load_table(out: str | Path) -> Any:
    """The table of a saved FeatureDiff; damaged files are a one-line DiffkitError, never a wrong table."""
    import pandas as pd

    from .io import verify_sha256

    out = Path(out)
    fix = f"run `diffkit align --out {out}` again"
    sums = load_diff_meta(out)["sha256"]
    path = out / "features.parquet"
    if not path.is_file():
        raise DiffkitError(f"{path} is missing: {fix}")
    verify_sha256(path, sums.get("features.parquet"), fix)
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types (ArrowInvalid, OSError, ...) for damage
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DiffkitError(f"{path} cannot be read ({reason}): {fix}") from None
    missing = [c for c in ("kind", "feature_a", "feature_b", "similarity", "score", "rank") if c not in table.columns]
    if missing:
        raise DiffkitError(f"{path} lacks the columns {missing}: {fix}")
    return table


def format_summary(diff: FeatureDiff, top: int = 5) -> str:
    """The printed summary: counts, map quality, match quality, and the top features each way with contexts."""
    s, t = diff.summary, diff.table
    q = s["similarity_quantiles"]
    m = s["map"]["scores"]
    lines = [f"map ({s['map']['method']}): held-out FVE A→B {m['a_to_b']['heldout_fve']:.3f}, "
             f"B→A {m['b_to_a']['heldout_fve']:.3f}",
             f"assignment ({s['solver']}): similarity of assigned pairs median {q['0.5']:.3f} "
             f"(10% {q['0.1']:.3f}, 90% {q['0.9']:.3f})",
             f"at threshold {s['threshold']:g}: {s['counts']['shared']} shared, {s['counts']['a_only']} A-only, "
             f"{s['counts']['b_only']} B-only (of {s['n_a']} A and {s['n_b']} B features; {s['tokens']:,} tokens)"]
    cal = s.get("calibration")
    if cal:
        by_map = (f", {cal['changed_by_map_error']} of them where the map fails"
                  if cal.get("null_map_error") else "")
        lines.append(f"calibrated: {cal['sentence']}; {cal['calls']['changed']} changed at FDR {100 * cal['fdr']:g}%"
                     f"{by_map}; null for changed: {cal['null_changed'].split(':')[0]}")
    for note in s["notes"]:
        lines.append(f"note: {note}")
    for side, name in (("a", "A"), ("b", "B")):
        only = t[t.kind == f"{side}_only"]
        if cal:  # calls first (most significant first), then the rest in the table's order
            only = only.assign(_call=only.verdict != f"{side}_only").sort_values(["_call", "q_exclusive"], kind="stable")
        order = "map error" if diff.config.rank_by == "map-error" else "activation mass"
        lines.append(f"top {name}-only features ({'calls at the FDR first, by q; then by ' + order if cal else 'by ' + order}):")
        for _, r in only.head(top).iterrows():
            i = int(r[f"feature_{side}"])
            q = f" retention {r.retention:.2f} q {r.q_exclusive:.3g} {r.verdict}" if cal else ""
            lines.append(f"  {name}#{i:<6} freq {r[f'freq_{side}']:.4f} mean act {r[f'mean_act_{side}']:.4f} "
                         f"best partner sim {r.similarity:.2f}{q}")
            for ctx in diff.contexts.get((side, i), [])[:3]:
                lines.append(f"      {ctx!r}")
    shared = t[t.kind == "shared"].head(top)
    lines.append(f"top shared pairs by {diff.config.rank_by} (most different first):")
    for _, r in shared.iterrows():
        a, b = int(r.feature_a), int(r.feature_b)
        q = f", q_changed {r.q_changed:.3g}" if cal else ""
        lines.append(f"  A#{a:<6} ~ B#{b:<6} sim {r.similarity:.2f} score {r.score:.3f} enc norm {r.enc_norm_a:.3f} vs "
                     f"{r.enc_norm_b:.3f}, freq {r.freq_a:.4f} vs {r.freq_b:.4f}, corr {r.pair_corr:.2f}{q}")
        for ctx in (diff.contexts.get(("a", a)) or diff.contexts.get(("b", b)) or [])[:2]:
            lines.append(f"      {ctx!r}")
    return "\n".join(lines)
