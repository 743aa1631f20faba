"""Where the two models disagree: the fitted map's per-token error, and the mean activation difference.

Both are training-free and need no SAE; with SAEs they also rank features. "Where the alignment
fails is where the two models differ": a fine-tune that planted a behaviour on a few tokens leaves
the rest of the residual stream predictable from the base's, so the tokens the map cannot predict
are the planted ones, and the features that fire there are the planted features.

**Map failure** (per token t, raw units of the target model, the map of :mod:`diffkit.linear_map`)::

    e_B(t) = ‖x_B,t − (x_A,t W_ab + b_ab)‖²      what of B the map from A cannot predict
    e_A(t) = ‖x_A,t − (x_B,t W_ba + b_ba)‖²      the same B→A

Feature score (B's SAE features with e_B, A's with e_A; f_i,t ≥ 0 the feature's activation,
ē = mean_t e(t) over the split)::

    map_err_i = (Σ_t f_i,t e(t) + c ē) / (Σ_t f_i,t + c) / ē,    c = PRIOR_FIRINGS · median_i(Σ_t f_i,t / #{t: f_i,t > 0})

the activation-weighted mean error where the feature fires, over the overall mean (1 = no more
error than anywhere), shrunk toward 1 by a prior worth ``PRIOR_FIRINGS`` (3) typical firings, so
that a feature firing once on one badly-mapped token does not outrank one that fires on many. The
table also has the unshrunk ratio (``map_err_raw``), the mean error on firing tokens over ē
(``map_err_fire``) and the sums behind them (``mass_err`` = Σ_t f e, ``fires``, ``fire_err``), so
another estimator needs no second pass.

**Activation difference** (Minder et al. 2025). δ_t = x_B,t − x_A,t when the widths agree
(``mode="direct"``), else δ_t = x_B,t − (x_A,t W_ab + b_ab) (``mode="map"``). Its mean over the
split and per position in the sequence, projected on each SAE's decoder rows (``diff_cos_i`` =
cos(δ̄, d_i); A's SAE: δ̄ for direct, the mean of (x_B W_ba + b_ba) − x_A for map) and through the
model's unembedding (:func:`promoted_tokens`). The affine map's bias absorbs the overall mean, so
in ``map`` mode δ̄ over the train split is 0 by construction: only its per-position (and held-out)
means carry signal. Per feature also ``diff_along_i = Σ_t f_i,t ⟨δ_t, d̂_i⟩ / Σ_t f_i,t``: the
difference along the feature's direction where it fires. Per token, ‖δ_t‖² is the method's
token score (in ``map`` mode it equals e_B).

Everything is one streamed pass (:class:`Divergence`, a :class:`diffkit.diff.StatAccumulator`,
so it rides on ``align``'s pass): memory is per-feature and per-width sums, the top-N worst rows
(a running top-k), and two float32 numbers per token for the per-token scores (kept for AUROC
and plots; 1/d of the store's size).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .codes import as_codes
from .errors import DiffkitError

DIVERGENCE_KIND = "diffkit.Divergence"
DIVERGENCE_FORMAT_VERSION = 1
TENSORS = "divergence.safetensors"
PRIOR_FIRINGS = 3.0  # chosen on the organisms (reports/organisms: "map-error estimator"): 20 hid rare planted features
MODES = ("auto", "direct", "map")
SPLITS = ("all", "train", "heldout")


@dataclass(frozen=True)
class DivergenceConfig:
    """Options of a divergence pass (saved in ``config.json``)."""

    split: str = "all"
    mode: str = "auto"          # activation difference: direct (same width), map, or auto
    top_tokens: int = 200       # worst-mapped tokens kept with their contexts
    window: int = 12            # context tokens each side in the CSV
    batch_size: int = 4096
    top_promoted: int = 20      # tokens listed each way through the unembedding
    positions: int = 8          # first positions whose mean difference goes through the unembedding

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DiffkitError(f"unknown --split {self.split!r}: use one of {', '.join(SPLITS)}")
        if self.mode not in MODES:
            raise DiffkitError(f"unknown --mode {self.mode!r}: use one of {', '.join(MODES)}")
        if min(self.top_tokens, self.batch_size, self.top_promoted) < 1 or self.window < 0 or self.positions < 0:
            raise DiffkitError("--top, --batch-size and --promoted must be positive, --window and --positions >= 0")


def split_positions(store: Any, split: str) -> np.ndarray:
    """Position in its sequence of every row of ``split``, in ``iter_batches(shuffle=False)`` order."""
    out = []
    ctx = int(store.config.ctx)
    start, stop = store._split_bounds(split)  # the store's own split layout (rows are contiguous per shard)
    for s in range(store.n_shards):
        if stop[s] > start[s]:
            out.append(np.asarray(store._array(s, "pos")[start[s]:stop[s]]) % ctx)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def store_labels(store: Any, split: str) -> np.ndarray | None:
    """The store's per-token labels for ``split`` (0 = ordinary text), or None for a store without them."""
    if not getattr(store, "has_labels", False):
        return None
    return np.asarray(store.labels(split)).astype(np.int64)


def _topk_merge(vals: Any, rows: Any, new_vals: Any, new_rows: Any, k: int) -> tuple[Any, Any]:
    import torch

    v, r = torch.cat([vals, new_vals]), torch.cat([rows, new_rows])
    keep = v.topk(min(k, len(v))).indices
    return v[keep], r[keep]


class Divergence:
    """The streamed statistics of the module docstring (``update`` per batch, then :meth:`finish`).

    ``W_dec_a`` / ``W_dec_b``: decoder rows of each SAE (None: no feature scores on that side).
    ``labels``: optional per-row ints of the split (0 = ordinary, 1.. = planted parts): per-feature
    activation mass on each label is summed in the same pass, for scoring against an answer key.
    """

    def __init__(self, lmap: Any, n_tokens: int, positions: np.ndarray | None = None, n_ctx: int = 0,
                 W_dec_a: Any = None, W_dec_b: Any = None, mode: str = "auto", top_tokens: int = 200,
                 labels: np.ndarray | None = None):
        import torch

        d_a, d_b = lmap.d_a_, lmap.d_b_
        if mode == "auto":
            mode = "direct" if d_a == d_b else "map"
        if mode == "direct" and d_a != d_b:
            raise DiffkitError(f"--mode direct needs equal widths (the store has {d_a} and {d_b}): use --mode map")
        self.mode, self.n, self.top_n = mode, int(n_tokens), int(top_tokens)
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
        self.W_ab, self.b_ab, self.W_ba, self.b_ba = t(lmap.W_ab_), t(lmap.b_ab_), t(lmap.W_ba_), t(lmap.b_ba_)
        self.err = {s: np.zeros(self.n, np.float32) for s in ("a", "b")}
        self.diff_norm = np.zeros(self.n, np.float32)
        self.top = {s: (torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)) for s in ("a", "b")}
        self.positions = None if positions is None else torch.as_tensor(positions, dtype=torch.int64)
        self.n_ctx = int(n_ctx) if positions is None else max(int(n_ctx), int(positions.max()) + 1 if len(positions) else 0)
        self.delta_sum = {"b": torch.zeros(d_b, dtype=torch.float64), "a": torch.zeros(d_a, dtype=torch.float64)}
        self.delta_pos = torch.zeros(self.n_ctx, d_b, dtype=torch.float64)
        self.count_pos = torch.zeros(self.n_ctx, dtype=torch.float64)
        self.err_pos = torch.zeros(self.n_ctx, dtype=torch.float64)
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.n_labels = 0 if labels is None or not len(labels) else int(self.labels.max()) + 1
        self.unit = {}  # each feature's unit decoder direction, normalized in float64, kept in float32 (65k × 2304: 0.6 GB)
        for s, dec in (("a", W_dec_a), ("b", W_dec_b)):
            if dec is not None:
                dec = torch.as_tensor(dec).double()
                self.unit[s] = (dec / dec.norm(dim=1, keepdim=True).clamp(min=1e-12)).float()
                del dec
        self.feat = {}
        for s, unit in self.unit.items():
            z = lambda: torch.zeros(len(unit), dtype=torch.float64)  # noqa: E731
            self.feat[s] = {"mass": z(), "mass_err": z(), "fires": z(), "fire_err": z(), "along": z()}
            self.feat[s]["mass_by_label"] = torch.zeros(max(self.n_labels, 1), len(unit), dtype=torch.float64)
        self.row0 = 0

    def update(self, xa: Any, xb: Any, fa: Any = None, fb: Any = None) -> None:
        """One batch of raw activations (rows in split order) and, optionally, both SAEs' features."""
        import torch

        xa, xb = xa.double(), xb.double()
        m = len(xa)
        r0, r1 = self.row0, self.row0 + m
        if r1 > self.n:
            raise DiffkitError(f"divergence pass got more rows ({r1}) than the split has ({self.n})")
        res_b = xb - (xa @ self.W_ab + self.b_ab)       # B's residual after the A→B map
        res_a = (xb @ self.W_ba + self.b_ba) - xa       # B's view in A's space minus A (sign: B minus A)
        e = {"b": (res_b ** 2).sum(1), "a": (res_a ** 2).sum(1)}
        delta_b = xb - xa if self.mode == "direct" else res_b
        delta_a = xb - xa if self.mode == "direct" else res_a
        dn = (delta_b ** 2).sum(1)
        rows = torch.arange(r0, r1)
        for s in ("a", "b"):
            self.err[s][r0:r1] = e[s].float().numpy()
            self.top[s] = _topk_merge(*self.top[s], e[s], rows, self.top_n)
        self.diff_norm[r0:r1] = dn.float().numpy()
        self.delta_sum["b"] += delta_b.sum(0)
        self.delta_sum["a"] += delta_a.sum(0)
        if self.positions is not None:
            pos = self.positions[r0:r1]
            self.delta_pos.index_add_(0, pos, delta_b)
            self.count_pos.index_add_(0, pos, torch.ones(m, dtype=torch.float64))
            self.err_pos.index_add_(0, pos, e["b"])
        lab = None if self.labels is None else self.labels[r0:r1]
        for s, f, delta in (("a", as_codes(fa), delta_a), ("b", as_codes(fb), delta_b)):
            if s not in self.feat or f is None:
                continue
            row, col, val = f.entries()  # O(active), not O(rows × features): see diffkit.codes
            n_feat = len(self.unit[s])
            acc = self.feat[s]
            acc["mass"].index_add_(0, col, val)
            acc["mass_err"].index_add_(0, col, e[s][row] * val)
            on = (val > 0).double()
            acc["fires"].index_add_(0, col, on)
            acc["fire_err"].index_add_(0, col, e[s][row] * on)
            step = max(1, (1 << 22) // delta.shape[1])
            for lo in range(0, len(col), step):  # ⟨δ_t, d̂_i⟩ only where feature i fires on token t
                sl = slice(lo, lo + step)
                acc["along"].index_add_(0, col[sl], (delta[row[sl]] * self.unit[s][col[sl]].double()).sum(1) * val[sl])
            if lab is not None:
                flat = lab[row] * n_feat + col
                acc["mass_by_label"].view(-1).index_add_(0, flat, val)
        self.row0 = r1

    def finish(self) -> "DivergenceResult":
        """The per-token scores, the mean differences and (with SAEs) the per-feature scores."""
        if self.row0 != self.n:
            raise DiffkitError(f"divergence pass saw {self.row0} of the split's {self.n} rows: it was interrupted")
        n = max(1, self.n)
        mean_err = {s: float(self.err[s].astype(np.float64).mean()) if self.n else float("nan") for s in ("a", "b")}
        features = {}
        for s, acc in self.feat.items():
            features[s] = feature_scores({k: v.numpy() for k, v in acc.items()}, mean_err[s], self.n,
                                         self.delta_sum[s].numpy() / n, self.unit[s].numpy())
        cnt = self.count_pos.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            delta_pos = self.delta_pos.numpy() / cnt[:, None]
            err_pos = self.err_pos.numpy() / cnt
        top = {s: (self.top[s][1].numpy(), self.top[s][0].numpy()) for s in ("a", "b")}
        return DivergenceResult(mode=self.mode, n=self.n, token_error={s: self.err[s] for s in ("a", "b")},
                                token_diff=self.diff_norm, mean_error=mean_err,
                                mean_delta={s: v.numpy() / n for s, v in self.delta_sum.items()},
                                mean_delta_by_pos=delta_pos, count_by_pos=cnt, error_by_pos=err_pos,
                                top_rows={s: top[s][0] for s in top}, top_errors={s: top[s][1] for s in top},
                                features=features)

    # -- the FeatureDiff hook ------------------------------------------------------------------------
    def feature_columns(self, table: Any, rank: bool) -> Any:
        """Add ``map_err_a`` / ``map_err_b`` (the feature score above) to a FeatureDiff table; with ``rank``,
        score and rank every row by it (shared pairs: the larger of their two sides; unmatched: their side's)."""
        res = self.finish()
        table = table.copy()
        for s in ("a", "b"):
            col = np.full(len(table), np.nan)
            if s in res.features:
                idx = table[f"feature_{s}"].to_numpy()
                ok = idx >= 0
                col[ok] = res.features[s]["map_err"].to_numpy()[idx[ok]]
            table[f"map_err_{s}"] = col
        if rank:
            table["score"] = np.fmax(table.map_err_a.to_numpy(), table.map_err_b.to_numpy())
            order = {"a_only": 0, "b_only": 1, "shared": 2}
            table = table.sort_values(["kind", "score"], key=lambda c: c.map(order) if c.name == "kind" else -c,
                                      kind="stable").reset_index(drop=True)
            table["rank"] = table.groupby("kind").cumcount() + 1
        self.result_ = res
        return table


def map_error_score(mass_err: np.ndarray, mass: np.ndarray, fires: np.ndarray, mean_err: float,
                    prior_firings: float = PRIOR_FIRINGS) -> np.ndarray:
    """``map_err`` of the module docstring from the streamed sums (pure; the prior in typical firings)."""
    live = fires > 0
    typical = float(np.median(mass[live] / fires[live])) if live.any() else 1.0  # mass of one typical firing
    c = prior_firings * typical
    ebar = mean_err if mean_err > 0 else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass + c > 0, (mass_err + c * ebar) / np.where(mass + c > 0, mass + c, 1.0) / ebar, np.nan)


def feature_scores(acc: dict, mean_err: float, n: int, mean_delta: np.ndarray, dec: np.ndarray) -> Any:
    """Per-feature table of the module docstring's formulas, from the streamed sums (pure function)."""
    import pandas as pd

    mass, fires = acc["mass"], acc["fires"]
    ebar = mean_err if mean_err > 0 else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.where(mass > 0, acc["mass_err"] / np.where(mass > 0, mass, 1) / ebar, np.nan)
        fire = np.where(fires > 0, acc["fire_err"] / np.where(fires > 0, fires, 1) / ebar, np.nan)
        along = np.where(mass > 0, acc["along"] / np.where(mass > 0, mass, 1), 0.0)
    shrunk = map_error_score(acc["mass_err"], mass, fires, mean_err)
    unit = dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-12)
    dn = float(np.linalg.norm(mean_delta))
    cos = (unit @ mean_delta.astype(unit.dtype)).astype(np.float64) / dn if dn > 0 else np.zeros(len(dec))
    return pd.DataFrame({"feature": np.arange(len(dec)), "freq": fires / max(1, n), "mean_act": mass / max(1, n),
                         "map_err": shrunk, "map_err_raw": raw, "map_err_fire": fire, "diff_cos": cos,
                         "diff_along": along, "mass": mass, "mass_err": acc["mass_err"], "fires": fires,
                         "fire_err": acc["fire_err"],
                         **{f"mass_label{lab}": m for lab, m in enumerate(acc["mass_by_label"]) if lab > 0}})


@dataclass
class DivergenceResult:
    mode: str
    n: int
    token_error: dict            # "a" | "b" -> (n,) float32: e_A, e_B per row of the split
    token_diff: np.ndarray       # (n,) ‖δ_t‖²
    mean_error: dict             # side -> ē
    mean_delta: dict             # side -> δ̄ in that side's space
    mean_delta_by_pos: np.ndarray  # (n_ctx, d_b)
    count_by_pos: np.ndarray
    error_by_pos: np.ndarray     # mean e_B per position
    top_rows: dict               # side -> rows of the worst-mapped tokens, worst first
    top_errors: dict
    features: dict = field(default_factory=dict)  # side -> DataFrame (feature_scores)
    promoted: dict = field(default_factory=dict)  # name -> {"up": [(token, logit)], "down": [...]}
    notes: list = field(default_factory=list)


def run_divergence(store: Any, lmap: Any, cfg: DivergenceConfig = DivergenceConfig(), sae_a: Any = None,
                   sae_b: Any = None, model_b: Any = None, progress: bool = False,
                   log: Callable[[str], None] = lambda _: None) -> DivergenceResult:
    """One pass over ``cfg.split``: map failure and activation difference, features scored when SAEs are given;
    ``model_b`` (a :class:`~diffkit.models.LoadedModel`) adds the tokens the mean difference promotes."""
    import torch
    from .progress import tqdm

    from .saes import check_against_store

    if (lmap.d_a_, lmap.d_b_) != (store.d_model("a"), store.d_model("b")):
        raise DiffkitError(f"the map was fitted for widths {lmap.d_a_} -> {lmap.d_b_}, the store has "
                           f"{store.d_model('a')} -> {store.d_model('b')}: fit the map on this store")
    n = store.n_tokens(cfg.split)
    if n == 0:
        raise DiffkitError(f"the store has no tokens in split {cfg.split!r}: use --split all")
    notes = []
    for sae, side in ((sae_a, "a"), (sae_b, "b")):
        if sae is not None:
            notes += check_against_store(sae, store, side)
    acc = Divergence(lmap, n, split_positions(store, cfg.split), int(store.config.ctx),
                     None if sae_a is None else sae_a.W_dec, None if sae_b is None else sae_b.W_dec,
                     cfg.mode, cfg.top_tokens, store_labels(store, cfg.split))
    sa, sb = store.scale("a"), store.scale("b")
    batches = store.iter_batches(cfg.batch_size, split=cfg.split, shuffle=False, drop_last=False, normalized=False)
    for xa, xb in tqdm(batches, total=-(-n // cfg.batch_size), desc="divergence", unit="batch", disable=not progress):
        with torch.no_grad():
            fa = sae_a.encode(xa, sa) if sae_a is not None else None
            fb = sae_b.encode(xb, sb) if sae_b is not None else None
        acc.update(xa, xb, fa, fb)
    res = acc.finish()
    res.notes = notes
    if model_b is not None:
        res.promoted = promotions(res, model_b, cfg, store_vocab(store))
    return res


def store_vocab(store: Any, min_share: float = 1e-4) -> np.ndarray:
    """The token ids that make up at least ``min_share`` of the store's sequences: the unembedding is read only
    over these (a token the models rarely or never saw has an untrained, arbitrary unembedding column)."""
    counts = np.zeros(0, np.int64)
    for s in range(store.n_shards):
        c = np.bincount(np.asarray(store._array(s, "ids")).ravel().astype(np.int64))
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[:len(c)] += c
    return np.flatnonzero(counts >= max(1.0, min_share * counts.sum()))


def promotions(res: DivergenceResult, model_b: Any, cfg: DivergenceConfig, vocab: np.ndarray | None = None) -> dict:
    """Tokens the mean difference promotes / suppresses through B's unembedding: overall and at the first positions."""
    out = {"overall": promoted_tokens(model_b, res.mean_delta["b"], cfg.top_promoted, vocab)}
    for p in range(min(cfg.positions, len(res.count_by_pos))):
        if res.count_by_pos[p] > 0:
            out[f"position {p}"] = promoted_tokens(model_b, res.mean_delta_by_pos[p], cfg.top_promoted, vocab)
    return out


def promoted_tokens(model: Any, delta: np.ndarray, k: int = 20, vocab: np.ndarray | None = None) -> dict:
    """The logit lens of a difference vector: ``δ`` through B's final norm's gain (centred first for LayerNorm,
    no bias: a direction, not a point) and ``W_U``; the ``k`` tokens it raises most and least (among ``vocab``)."""
    import torch

    tl = model.model
    d = torch.as_tensor(np.asarray(delta), dtype=torch.float64)
    if d.shape[0] != tl.cfg.d_model:
        raise DiffkitError(f"--model-b has d_model {tl.cfg.d_model}, the store's model B {d.shape[0]}: pass model B")
    norm = str(getattr(tl.cfg, "normalization_type", None) or "")
    if norm.startswith("LN"):
        d = d - d.mean()
    w = getattr(getattr(tl, "ln_final", None), "w", None)
    if w is not None:
        d = d * w.detach().double()
    logits = d @ tl.W_U.detach().double()
    special = {getattr(model.tokenizer, "bos_id", None), getattr(model.tokenizer, "pad_id", None)} - {None}
    if vocab is not None and len(vocab):
        keep = torch.full_like(logits, float("nan"))
        idx = torch.as_tensor([int(v) for v in np.asarray(vocab) if int(v) not in special], dtype=torch.int64)
        keep[idx] = logits[idx]
        logits = keep
    logits = logits - logits.nanmean()
    k = min(k, int((~logits.isnan()).sum()))
    dec = model.tokenizer.decode
    pick = lambda idx: [{"token": dec(np.array([int(i)])), "id": int(i), "logit": float(logits[i])}  # noqa: E731
                        for i in idx.tolist()]
    low = torch.finfo(torch.float64).min
    return {"up": pick(logits.nan_to_num(low).topk(k).indices), "down": pick((-logits).nan_to_num(low).topk(k).indices)}


# -- the artifact ------------------------------------------------------------------------------------------
def worst_tokens_frame(store: Any, res: DivergenceResult, split: str, window: int = 12) -> Any:
    """The worst-mapped tokens (A→B error), worst first, with their decoded contexts."""
    import pandas as pd

    from .diff import decode_contexts, store_tokenizer

    rows, errs = res.top_rows["b"], res.top_errors["b"]
    labels = store_labels(store, split)
    pos = split_positions(store, split)
    ctx = decode_contexts(store, rows, split, store_tokenizer(store), window=window) if len(rows) else []
    return pd.DataFrame({"rank": np.arange(1, len(rows) + 1), "row": rows, "error_ab": errs,
                         "error_ab_rel": errs / (res.mean_error["b"] or 1.0), "error_ba": res.token_error["a"][rows],
                         "position": pos[rows], **({"label": labels[rows]} if labels is not None else {}),
                         "context": ctx})


def summarize(res: DivergenceResult, lmap: Any, worst: Any, labels: np.ndarray | None) -> dict:
    """summary.json: overall errors, the feature tops, what the difference promotes, AUROCs when labelled."""
    from .metrics import auroc

    s: dict[str, Any] = {"mode": res.mode, "tokens": res.n, "mean_error": res.mean_error,
                         "mean_delta_norm": {k: float(np.linalg.norm(v)) for k, v in res.mean_delta.items()},
                         "map_heldout_fve": {d: lmap.scores_[d]["heldout_fve"] for d in lmap.scores_},
                         "error_by_position": [None if not math.isfinite(v) else float(v) for v in res.error_by_pos],
                         "promoted": res.promoted, "notes": res.notes,
                         "formulas": {"token_error_ab": "||x_B - (x_A W_ab + b_ab)||^2 (raw units of B)",
                                      "token_error_ba": "||x_A - (x_B W_ba + b_ba)||^2 (raw units of A)",
                                      "map_err": f"(sum_t f_t e_t + c ebar) / (sum_t f_t + c) / ebar, c = "
                                                 f"{PRIOR_FIRINGS:g} x median activation mass per firing",
                                      "diff_cos": "cos(mean_t delta_t, decoder row)",
                                      "delta": "x_B - x_A (direct) or x_B - (x_A W_ab + b_ab) (map)"}}
    if len(worst) and "label" in worst:
        s["worst_planted_fraction"] = float((worst.label.to_numpy() > 0).mean())
    if labels is not None and 0 < (labels > 0).sum() < len(labels):
        s["token_auroc"] = {"map_error_ab": auroc(res.token_error["b"], labels > 0),
                            "map_error_ba": auroc(res.token_error["a"], labels > 0),
                            "activation_difference": auroc(res.token_diff, labels > 0)}
    for side, df in res.features.items():
        top = df.sort_values("map_err", ascending=False, kind="stable").head(10)
        s[f"top_features_{side}"] = [{"feature": int(r.feature), "map_err": float(r.map_err), "freq": float(r.freq)}
                                     for r in top.itertuples()]
    return json.loads(json.dumps(s, default=float).replace("NaN", "null"))


def save_divergence(res: DivergenceResult, out: str | Path, cfg: DivergenceConfig, inputs: dict, summary: dict,
                    worst: Any) -> Path:
    """Write divergence.safetensors, worst_tokens.csv, features_{a,b}.csv, summary.json, then config.json
    (the last marks a complete artifact; each file atomically)."""
    import torch
    from safetensors.torch import save

    from .io import atomic_write_bytes, json_bytes, sha256_bytes, write_sealed_json

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffkitError(f"--out {out} is a file: pass a directory path")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists():
        (out / "config.json").unlink()  # an old config must not vouch for new files mid-write
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    tensors = {"token_error_ab": f32(res.token_error["b"]), "token_error_ba": f32(res.token_error["a"]),
               "token_diff": f32(res.token_diff), "mean_delta_b": f32(res.mean_delta["b"]),
               "mean_delta_a": f32(res.mean_delta["a"]), "mean_delta_by_pos": f32(np.nan_to_num(res.mean_delta_by_pos)),
               "count_by_pos": f32(res.count_by_pos), "top_rows_ab": torch.from_numpy(res.top_rows["b"].astype(np.int64))}
    for side, df in res.features.items():
        tensors[f"map_err_{side}"] = f32(df.map_err.to_numpy())
    data = save(tensors)
    atomic_write_bytes(out / TENSORS, data)
    sums = {TENSORS: sha256_bytes(data)}
    files = {"worst_tokens.csv": worst.to_csv(index=False, float_format="%.6g").encode(),
             "summary.json": json_bytes(summary)}
    for side, df in res.features.items():
        files[f"features_{side}.csv"] = df.to_csv(index=False, float_format="%.6g").encode()
    for name, body in files.items():
        atomic_write_bytes(out / name, body)
        sums[name] = sha256_bytes(body)
    write_sealed_json(out / "config.json", {"kind": DIVERGENCE_KIND, "format_version": DIVERGENCE_FORMAT_VERSION,
                                            "config": asdict(cfg), "inputs": inputs, "sha256": sums,
                                            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return out


def load_token_scores(out: str | Path) -> dict:
    """The per-token tensors of a saved divergence (checksum verified)."""
    from .io import load_safetensors, read_sealed_json, verify_sha256

    out = Path(out)
    fix = f"run `diffkit divergence --out {out}` again"
    if not (out / "config.json").exists():
        raise DiffkitError(f"{out} is not a complete divergence artifact (no config.json): {fix}")
    meta = read_sealed_json(out / "config.json", DIVERGENCE_KIND, DIVERGENCE_FORMAT_VERSION, fix)
    verify_sha256(out / TENSORS, (meta.get("sha256") or {}).get(TENSORS), fix)
    return {k: v.numpy() for k, v in load_safetensors(out / TENSORS, fix).items()}


def format_divergence(res: DivergenceResult, summary: dict, worst: Any, top: int = 8) -> str:
    """The printed summary: errors, worst tokens with contexts, top features, promoted tokens."""
    fve = summary["map_heldout_fve"]
    lines = [f"map held-out FVE A→B {fve['a_to_b']:.3f}, B→A {fve['b_to_a']:.3f}; mean per-token error A→B "
             f"{res.mean_error['b']:.4g}, B→A {res.mean_error['a']:.4g} ({res.n:,} tokens)",
             f"activation difference ({res.mode}): |mean δ| {summary['mean_delta_norm']['b']:.4g}"]
    for k, v in summary.get("token_auroc", {}).items():
        lines.append(f"token AUROC vs the store's labels, {k}: {v:.3f}")
    lines.append("worst-mapped tokens (error / mean):")
    for r in worst.head(top).itertuples():
        lab = f" label {r.label}" if hasattr(r, "label") else ""
        lines.append(f"  #{r.rank:<3} x{r.error_ab_rel:7.1f} pos {r.position:<4}{lab} {r.context!r}")
    for side, df in res.features.items():
        lines.append(f"{side.upper()}'s features by map error (where they fire / everywhere):")
        for r in df.sort_values("map_err", ascending=False, kind="stable").head(5).itertuples():
            lines.append(f"  {side.upper()}#{r.feature:<6} map_err {r.map_err:6.2f} (raw {r.map_err_raw:6.2f}) "
                         f"freq {r.freq:.4f} diff_cos {r.diff_cos:+.2f}")
    for name, p in res.promoted.items():
        if name == "overall" or name == "position 1":
            lines.append(f"mean difference ({name}) promotes: " + " ".join(repr(t["token"]) for t in p["up"][:10]))
    return "\n".join(lines)
