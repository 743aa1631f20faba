"""Per-latent analysis of a two-source crosscoder: the LatentTable and its summary.

LatentTable columns (one row per latent; norms are of the decoder in normalized space)::

    latent            index i
    label             dead | A-only | B-only | shared | intermediate (thresholds below)
    dead              did not fire on any analysed token
    dec_norm_a/_b     n_A = ‖W_dec[i, A]‖, n_B = ‖W_dec[i, B]‖
    rel_norm_r_b      r = n_B / (n_A + n_B)        (Anthropic 2024; 0 = A-only, 1 = B-only)
    rel_norm_delta_b  Δ = ((n_B − n_A) / max(n_A, n_B) + 1) / 2   (Minder et al. 2025 with B as
                      their "chat" model; 0 = A-only, 1 = B-only)
    dec_cos_ab        cos(W_dec[i, A], W_dec[i, B]) when the widths match; otherwise cos(W_dec[i, A] M,
                      W_dec[i, B]) with M a lstsq map A→B fitted on the store (normalized space)
    freq              fraction of tokens where f_i > 0
    mean_act          mean_t f_i,t;  mean_act_active: mean over tokens where f_i > 0
    beta_{rec,err}_{a,b}, nu_{rec,err}   Latent Scaling (exclusive latents; see below)
    r2_a, r2_b        R² of an affine ridge probe of the latent's activation from A's / B's residual
                      alone (:func:`diffkit.calibrate.probe_r2`; held-out when the analysed split has both)
    retention         R²(other) / R²(owner), owner = A if r < 0.5 else B (NaN if R²(owner) < 0.05)
    p_exclusive, q_exclusive   calibration of the A-only / B-only labels (below); NaN for other labels
    verdict           the label, except an A-only / B-only label with q_exclusive > fdr becomes
                      ``unconfirmed``: the calibrated call the head to head compares with align's

Labels from r: ``A-only`` if r ≤ 0.1, ``B-only`` if r ≥ 0.9, ``shared`` if 0.3 ≤ r ≤ 0.7,
``intermediate`` otherwise (the thresholds are options; r ≤ 0.1 is Δ ≤ 1/18).

Latent Scaling (Minder et al. 2025), closed form: for an exclusive latent ``j`` with owner ``o`` and
direction ``d = W_dec[j, o]``, for each source ``m`` (of the owner's width)::

    β_m = Σ_t f_j,t ⟨y_m,t, d⟩ / (‖d‖² Σ_t f_j,t²)      (least squares of y_m,t ≈ β f_j,t d)

with ``y = x̂_m`` (reconstruction, β_rec) or ``y = x_m − x̂_m + f_j W_dec[j, m]`` (error with the
latent's own contribution put back, β_err). ``ν = β_other / β_owner``: near 0 for a truly
exclusive latent; near 1 means the other model also carries the direction (Complete Shrinkage or
Latent Decoupling of the L1 loss).

Calibration (the same as align's, :mod:`diffkit.calibrate`): an exclusive label says the latent's
decoder writes to one model only; the model-level check is whether the *other* model's residual
still predicts the latent's activation (retention). Null: the retentions of the live latents
labelled ``shared`` (``p = (1 + #{ref ≤ retention}) / (1 + N)``, exponential tail below its minimum:
:func:`diffkit.calibrate.tailed_p_lower`), Benjamini–Hochberg q over the
latents labelled A-only or B-only, ``fdr`` (default 0.1). Not an identical-model crosscoder (that
is a second training run) nor a bootstrap (r is a property of the weights; tokens do not move it).

Summary scores (formulas also written into ``summary.json``):

- FVE per source: ``1 − Σ‖x − x̂‖² / Σ‖x − μ‖²`` over the analysed tokens (normalized units).
- sharedness ``S = Σ_i w_i (1 − |2 r_i − 1|) / Σ_i w_i`` over live latents, ``w_i = mean_act_i ·
  (n_A,i + n_B,i)`` (each latent's mean contribution to the reconstruction); 1 when every latent is
  used equally by both models (identical models), 0 when every latent belongs to one.
- CCA alignment: mean canonical correlation ``(1/k) Σ_j ρ_j`` of the two models' activations on the
  analysed tokens (``k = min(d_A, d_B)``; exactly 1 for identical models, ≈0 for independent ones);
  and the same between the decoder blocks ``W_dec[:, A]`` and ``W_dec[:, B]`` with live latents as
  observations (1 when one is a linear map of the other).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffkit.codes import Codes, FeatureTally
from diffkit.errors import DiffkitError
from diffkit.metrics import cca_of_samples, mean_cca  # noqa: F401  (moved to diffkit.metrics; re-exported)
from diffkit.io import (atomic_write_bytes, first_line, json_bytes, read_sealed_json, sha256_bytes, verify_sha256,
                        write_sealed_json)

from .metrics import FveAccumulator
from .model import CrossCoder

LABELS = ("A-only", "B-only", "shared", "intermediate", "dead")
LATENTS_KIND = "diffkit.LatentTable"
LATENTS_FORMAT_VERSION = 1
LATENTS_JSON = "latents.json"  # sealed (diffkit.io); the sha256 of every other file; written last


@dataclass(frozen=True)
class AnalyzeConfig:
    crosscoder: str
    acts: str
    out: str
    split: str = "heldout"
    tokens: int = 200_000          # at most this many tokens of the split are analysed
    batch_size: int = 4096
    exclusive_r: float = 0.1       # r ≤ this: A-only, r ≥ 1 − this: B-only
    shared_lo: float = 0.3
    shared_hi: float = 0.7
    top_n: int = 5                 # top latents each way in the summary
    fdr: float = 0.1               # false-discovery rate of the calibrated verdict
    n_contexts: int = 4            # top-activating contexts per listed latent
    window: int = 24


def relative_norms(n_A: torch.Tensor, n_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, Δ): ``r = n_B/(n_A+n_B)``, ``Δ = ((n_B − n_A)/max(n_A, n_B) + 1)/2``; both 1 = B-only."""
    total = (n_A + n_B).clamp(min=1e-12)
    return n_B / total, ((n_B - n_A) / torch.maximum(n_A, n_B).clamp(min=1e-12) + 1) / 2


def label_latents(r: torch.Tensor, dead: torch.Tensor, cfg: AnalyzeConfig) -> list[str]:
    out = []
    for ri, di in zip(r.tolist(), dead.tolist()):
        if di:
            out.append("dead")
        elif ri <= cfg.exclusive_r:
            out.append("A-only")
        elif ri >= 1 - cfg.exclusive_r:
            out.append("B-only")
        elif cfg.shared_lo <= ri <= cfg.shared_hi:
            out.append("shared")
        else:
            out.append("intermediate")
    return out


def sharedness(r: torch.Tensor, weight: torch.Tensor) -> float:
    """``Σ w (1 − |2r − 1|) / Σ w``: 1 if all weight sits on latents with r = 0.5, 0 if on r ∈ {0, 1}."""
    w = weight.double().clamp(min=0)
    return float((w * (1 - (2 * r.double() - 1).abs())).sum() / w.sum().clamp(min=1e-300))


class _Pass:
    """Streaming sums over the analysed tokens (memory O(L·n_contexts + D²))."""

    def __init__(self, model: CrossCoder, excl: torch.Tensor, owner: torch.Tensor, n_ctx: int, train_mask=None):
        from diffkit.calibrate import ProbeSums

        cfg = model.cfg
        L = cfg.dict_size
        self.probe = ProbeSums(cfg.d_in[0], cfg.d_in[1], L, 0, train_mask) if len(cfg.d_in) == 2 else None
        self.model, self.n_ctx = model, n_ctx
        self.tally = FeatureTally(L, n_ctx)  # per latent: firings, Σf, top rows
        self.acc = FveAccumulator(cfg.d_in)
        D = cfg.d_total
        self.cov = torch.zeros(D, D, dtype=torch.float64)
        self.sum_D = torch.zeros(D, dtype=torch.float64)
        self.rows = 0
        # Latent scaling: only when the widths match (one direction space for both models).
        self.excl, self.owner = excl, owner
        self.same_width = len(set(cfg.d_in)) == 1
        E, M = len(excl), len(cfg.d_in)
        self.num_rec = torch.zeros(M, E, dtype=torch.float64)
        self.num_err = torch.zeros(M, E, dtype=torch.float64)
        self.den = torch.zeros(E, dtype=torch.float64)
        if E:
            W = model.split(model.W_dec_LD.detach()[excl])      # per source: E × d_m
            self.dir_Ed = torch.stack([W[o][e] for e, o in enumerate(owner.tolist())]) if self.same_width else None
            self.W_E = W

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor) -> None:
        model = self.model
        out = model(x_BD, train=False)
        f = out.f_BL
        xs, xh = model.split(x_BD), model.split(out.x_hat_BD)
        self.acc.update(xs, xh, float((f > 0).sum()))
        codes = Codes(f)  # its nonzero entries, found once for the tally and the probe sums
        if self.probe is not None:
            self.probe.update(xs[0], xs[1], codes, f[:, :0])
        self.tally.add(codes)
        xd = x_BD.double()
        self.cov += xd.T @ xd
        self.sum_D += xd.sum(0)
        self.rows += x_BD.shape[0]
        if len(self.excl) and self.dir_Ed is not None:
            fE = f[:, self.excl].double()
            d = self.dir_Ed.double()
            self.den += fE.pow(2).sum(0) * d.pow(2).sum(1)
            for m in range(len(xs)):
                own = (self.W_E[m].double() * d).sum(1)              # ⟨W_dec[j, m], d⟩
                rec = xh[m].double() @ d.T
                err = (xs[m].double() - xh[m].double()) @ d.T + fE * own
                self.num_rec[m] += (fE * rec).sum(0)
                self.num_err[m] += (fE * err).sum(0)


def analyze(cfg: AnalyzeConfig, progress: bool = True) -> dict:
    """Run the analysis; write latents.parquet/.csv, summary.json, analyze_config.json in ``cfg.out``, then
    ``latents.json`` (sealed, with their sha256s: read them back with :func:`load_latents`)."""
    from itertools import islice

    import pandas as pd
    from diffkit.progress import tqdm

    from diffkit.activations import ActivationStore

    from .model import load

    model = load(cfg.crosscoder)
    store = ActivationStore.open(cfg.acts)
    if len(model.cfg.d_in) != 2:
        raise DiffkitError(f"analyze compares two sources; {cfg.crosscoder} has {len(model.cfg.d_in)}")
    widths = (store.d_model("a"), store.d_model("b"))
    if widths != model.cfg.d_in:
        raise DiffkitError(f"store {cfg.acts} has widths {widths}, the crosscoder was trained on {model.cfg.d_in}: "
                           "analyze it on a store of the same models and hooks")
    if store.n_tokens(cfg.split) == 0:
        raise DiffkitError(f"store {cfg.acts} has no {cfg.split} tokens: pass --split train")
    scale_now = (store.scale("a"), store.scale("b"))
    if not np.allclose(scale_now, model.cfg.scale, rtol=1e-4):
        raise DiffkitError(f"store {cfg.acts} normalizes with {scale_now}, the crosscoder with {model.cfg.scale}: "
                           "not the store it was trained on")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    norms = model.dec_norms_LM().detach()
    n_A, n_B = norms[:, 0], norms[:, 1]
    r, delta = relative_norms(n_A, n_B)
    excl = torch.nonzero((r <= cfg.exclusive_r) | (r >= 1 - cfg.exclusive_r)).flatten()
    owner = (r[excl] >= 0.5).long()  # 0: A owns it, 1: B
    from diffkit.calibrate import train_mask_fn

    pas = _Pass(model, excl, owner, cfg.n_contexts, train_mask_fn(store, cfg.split))
    n_tok = min(cfg.tokens, store.n_tokens(cfg.split))
    n_batches = -(-n_tok // cfg.batch_size)
    it = store.iter_batches(cfg.batch_size, split=cfg.split, shuffle=False, drop_last=False)
    for xs in tqdm(islice(it, n_batches), total=n_batches, desc="analyze", disable=not progress):
        x = torch.cat(xs, dim=1)
        pas.update(x)

    count = pas.tally.count.double()
    freq = count / max(pas.rows, 1)
    mean_act = pas.tally.sum / max(pas.rows, 1)
    dead = count == 0
    labels = label_latents(r, dead, cfg)
    dec_cos, dec_cos_method = _dec_cos(model, store)
    table = pd.DataFrame({
        "latent": np.arange(model.cfg.dict_size), "label": labels, "dead": dead.numpy(),
        "dec_norm_a": n_A.numpy(), "dec_norm_b": n_B.numpy(),
        "rel_norm_r_b": r.numpy(), "rel_norm_delta_b": delta.numpy(),
        "dec_cos_ab": dec_cos.numpy(),
        "freq": freq.numpy(), "mean_act": mean_act.numpy(),
        "mean_act_active": (pas.tally.sum / count.clamp(min=1)).numpy(),
    })
    for col in ("beta_rec_a", "beta_rec_b", "beta_err_a", "beta_err_b", "nu_rec", "nu_err"):
        table[col] = np.nan
    if len(excl) and pas.dir_Ed is not None:
        den = pas.den.clamp(min=1e-300)
        beta_rec, beta_err = pas.num_rec / den, pas.num_err / den  # M × E
        idx = excl.numpy()
        for m, s in enumerate(("a", "b")):
            table.loc[idx, f"beta_rec_{s}"] = beta_rec[m].numpy()
            table.loc[idx, f"beta_err_{s}"] = beta_err[m].numpy()
        o = owner.numpy()
        ar = np.arange(len(idx))
        with np.errstate(divide="ignore", invalid="ignore"):
            table.loc[idx, "nu_rec"] = beta_rec[1 - o, ar].numpy() / beta_rec[o, ar].numpy()
            table.loc[idx, "nu_err"] = beta_err[1 - o, ar].numpy() / beta_err[o, ar].numpy()
    table.loc[dead.numpy(), [c for c in table.columns if c.startswith(("beta", "nu"))]] = np.nan

    calibration = _calibrate(table, pas, cfg.fdr)
    summary = _summary(cfg, model, store, pas, table, r, mean_act, n_A, n_B, dead)
    summary["dec_cos_method"] = dec_cos_method
    summary["calibration"] = calibration
    import io

    (out / LATENTS_JSON).unlink(missing_ok=True)  # an old descriptor must not vouch for new files mid-write
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    files = {"latents.parquet": buf.getvalue(), "latents.csv": table.to_csv(index=False).encode(),
             "summary.json": json_bytes(summary), "analyze_config.json": json_bytes(asdict(cfg))}
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    write_sealed_json(out / LATENTS_JSON, {"kind": LATENTS_KIND, "format_version": LATENTS_FORMAT_VERSION,
                                           "config": asdict(cfg),
                                           "sha256": {k: sha256_bytes(v) for k, v in files.items()}})
    return summary


def _analysis_file(out: Path, name: str) -> Path:
    """``out / name`` after checking the sealed descriptor and the file's recorded sha256."""
    out = Path(out)
    fix = f"run `diffkit crosscoder analyze --out {out}` again"
    if not (out / LATENTS_JSON).exists():
        raise DiffkitError(f"{out} is not a complete crosscoder analysis (no {LATENTS_JSON}): {fix}")
    meta = read_sealed_json(out / LATENTS_JSON, LATENTS_KIND, LATENTS_FORMAT_VERSION, fix)
    sums = meta.get("sha256")
    verify_sha256(out / name, sums.get(name) if isinstance(sums, dict) else None, fix)
    return out / name


def load_latents(out: str | Path) -> Any:
    """The LatentTable of an analysis directory; damage is a one-line DiffkitError, never a wrong table."""
    import pandas as pd

    path = _analysis_file(Path(out), "latents.parquet")
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - a checksummed file that still fails: report it, one line
        raise DiffkitError(f"{path} cannot be read ({first_line(exc, 120)}): run the analysis again") from None
    missing = [c for c in ("latent", "label", "dead", "rel_norm_r_b") if c not in table.columns]
    if missing:
        raise DiffkitError(f"{path} lacks the columns {missing}: run the analysis again")
    return table


def load_analysis_summary(out: str | Path) -> dict:
    """``summary.json`` of an analysis directory, checked against its recorded sha256."""
    from diffkit.io import read_json_object

    return read_json_object(_analysis_file(Path(out), "summary.json"), "run the analysis again")


def _calibrate(table, pas: _Pass, fdr: float) -> dict:
    """Retention, p/q of the exclusive labels and the calibrated verdict (module docstring)."""
    from diffkit.calibrate import R2_FLOOR, benjamini_hochberg, tailed_p_lower

    r2a, r2b = pas.probe.r2("a", "a"), pas.probe.r2("b", "a")
    owner_b = table["rel_norm_r_b"].to_numpy() >= 0.5
    own, other = np.where(owner_b, r2b, r2a), np.where(owner_b, r2a, r2b)
    with np.errstate(divide="ignore", invalid="ignore"):
        ret = np.where(own >= R2_FLOOR, np.clip(other, 0, None) / own, np.nan)
    label = table["label"].to_numpy()
    ref = ret[(label == "shared") & np.isfinite(ret)]
    fam = np.isin(label, ["A-only", "B-only"])
    p = np.where(fam, tailed_p_lower(ret, ref), np.nan)
    q = benjamini_hochberg(p)
    table["r2_a"], table["r2_b"], table["retention"] = r2a, r2b, ret
    table["p_exclusive"], table["q_exclusive"] = p, q
    table["verdict"] = np.where(fam & ~(q <= fdr), "unconfirmed", label)
    n = {lab: int((label == lab).sum()) for lab in ("A-only", "B-only")}
    calls = {lab: int((table["verdict"].to_numpy() == lab).sum()) for lab in ("A-only", "B-only")}
    return {"fdr": fdr, "calls": calls, "labelled": n, "heldout_probe": "heldout" in pas.probe.parts,
            "null_exclusive": f"shared-latent null: retention of the {len(ref)} live latents labelled shared",
            "sentence": f"{calls['A-only']} A-only at FDR {100 * fdr:g}% (of {n['A-only']} labelled), {calls['B-only']} "
                        f"B-only (of {n['B-only']} labelled); null: shared-latent null"}


def _dec_cos(model: CrossCoder, store) -> tuple[torch.Tensor, str]:
    """Cosine of each latent's A and B decoder blocks: directly when the widths match, otherwise after
    carrying the A block into B's space with a least-squares map fitted on the store (normalized
    space, :class:`diffkit.linear_map.LinearMap`)."""
    W = model.split(model.W_dec_LD.detach())
    if W[0].shape[1] == W[1].shape[1]:
        return torch.nn.functional.cosine_similarity(W[0], W[1], dim=1, eps=1e-12), "direct (equal widths)"
    try:
        from diffkit.linear_map import LinearMap
    except ImportError:
        return torch.full((model.cfg.dict_size,), float("nan")), "n/a: widths differ and no LinearMap is available"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lmap = LinearMap(method="lstsq", space="normalized").fit(store)
    carried = torch.as_tensor(lmap.carry_directions(W[0].double().numpy()), dtype=torch.float32)
    fve = lmap.scores_["a_to_b"]["heldout_fve"]
    return (torch.nn.functional.cosine_similarity(carried, W[1], dim=1, eps=1e-12),
            f"A block carried into B's space by a lstsq LinearMap fitted on the store (normalized space; held-out "
            f"FVE A->B {fve:.3f})")


def _summary(cfg, model, store, pas, table, r, mean_act, n_A, n_B, dead) -> dict:
    fves = pas.acc.fve()
    D_a = model.cfg.d_in[0]
    n = max(pas.rows, 1)
    mu = pas.sum_D / n
    cov = pas.cov / n - torch.outer(mu, mu)
    alive = ~dead
    W = model.split(model.W_dec_LD.detach())
    summary: dict[str, Any] = {
        "crosscoder": cfg.crosscoder, "acts": cfg.acts, "split": cfg.split, "tokens": pas.rows,
        "arch": model.cfg.arch, "dict_size": model.cfg.dict_size,
        "fve_a": fves[0], "fve_b": fves[1], "l0": pas.acc.l0(), "dead_frac": float(dead.double().mean()),
        "counts": {lab: int((table["label"] == lab).sum()) for lab in LABELS},
        "sharedness": sharedness(r[alive], (mean_act * (n_A + n_B).double())[alive]),
        "cca_activations": mean_cca(cov[:D_a, :D_a], cov[D_a:, D_a:], cov[:D_a, D_a:]),
        "cca_decoders": cca_of_samples(W[0][alive], W[1][alive]) if int(alive.sum()) > 2 else float("nan"),
        "thresholds": {"A-only": f"r <= {cfg.exclusive_r}", "B-only": f"r >= {1 - cfg.exclusive_r:g}",
                       "shared": f"{cfg.shared_lo} <= r <= {cfg.shared_hi}", "dead": "never fired"},
        "formulas": {
            "fve": "1 - sum_t ||x_t - xhat_t||^2 / sum_t ||x_t - mean_t x||^2, per source, normalized units",
            "l0": "mean number of latents with f > 0 per token (inference encoding)",
            "rel_norm_r_b": "n_B / (n_A + n_B), n_m = ||W_dec[i, m]||",
            "rel_norm_delta_b": "((n_B - n_A) / max(n_A, n_B) + 1) / 2",
            "sharedness": "sum_i w_i (1 - |2 r_i - 1|) / sum_i w_i, w_i = mean_act_i (n_A,i + n_B,i), live latents",
            "cca_activations": "mean of the min(d_A, d_B) canonical correlations of x_A and x_B",
            "cca_decoders": "mean canonical correlation of W_dec[:, A] and W_dec[:, B], live latents as samples",
            "latent_scaling": "beta_m = sum_t f_t <y_m,t, d> / (||d||^2 sum_t f_t^2); nu = beta_other / beta_owner",
        },
    }
    summary["top"] = {lab: _top_latents(table, lab, pas, store, cfg) for lab in ("A-only", "B-only")}
    return json.loads(json.dumps(summary, default=float).replace("NaN", "null"))


def _decoder_for(store):
    name = store.manifest["sources"]["a"].get("tokenizer")
    if name == "diffkit-byte-v1":
        from diffkit.tokenizer import ByteTokenizer

        return ByteTokenizer().decode
    return lambda ids: " ".join(str(int(i)) for i in np.asarray(ids).ravel())


def _top_latents(table, label: str, pas: _Pass, store, cfg: AnalyzeConfig) -> list[dict]:
    """The most frequent latents of ``label``, each with its top-activating contexts (token in «»)."""
    decode = _decoder_for(store)
    rows = table[table["label"] == label].sort_values("freq", ascending=False).head(cfg.top_n)
    out = []
    for _, row in rows.iterrows():
        i = int(row["latent"])
        vals, idxs = pas.tally.top_val[i], pas.tally.top_row[i]
        keep = vals > 0
        ctxs = store.contexts(idxs[keep].numpy(), split=cfg.split, window=cfg.window) if bool(keep.any()) else []
        texts = [decode(ids[:off]) + "«" + decode(ids[off:off + 1]) + "»" + decode(ids[off + 1:]) for ids, off in ctxs]
        out.append({"latent": i, "freq": float(row["freq"]), "rel_norm_r_b": float(row["rel_norm_r_b"]),
                    **({"q_exclusive": None if math.isnan(row["q_exclusive"]) else float(row["q_exclusive"])}
                       if "q_exclusive" in row else {}),
                    "nu_err": None if math.isnan(row["nu_err"]) else float(row["nu_err"]),
                    "contexts": [{"act": float(v), "text": t} for v, t in zip(vals[keep].tolist(), texts)]})
    return out
