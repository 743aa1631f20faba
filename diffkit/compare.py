"""Head to head: a FeatureDiff (``diffkit align``) against a crosscoder, on the same activation store.

Steps (:func:`compare`): check that the FeatureDiff, the crosscoder and the store belong together;
run the crosscoder analysis (:func:`baselines.crosscoder.analysis.analyze`) on the store's held-out
split; match the crosscoder's live latents one-to-one to each SAE's features by decoder cosine in
that model's space (:func:`diffkit.matching.assign`; the *bridge*); score how the two methods
agree on what is exclusive; measure reconstruction of each with one FVE formula
(:class:`diffkit.metrics.ErrorSums`); tally the cost of each. Writes ``comparison.json``,
``bridge.parquet`` (+ ``.csv``), ``precision_at_k.csv``, ``compare_config.json`` and
``crosscoder-analysis/`` to the output directory; :mod:`diffkit.report` turns it into a report.

The bridge and the agreement scores are :mod:`diffkit.agreement`.

Cost: measured wall time of each stage as recorded by its artifact (map fit, alignment; crosscoder
training, analysis), and analytic FLOPs (:data:`FLOP_FORMULAS`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .agreement import SIDES, agreement, bridge_side, bridge_table
from .errors import DiffkitError

COMPARE_KIND = "diffkit.Comparison"
COMPARE_FORMAT_VERSION = 2  # 2: comparison.json sealed (diffkit.io), with the sha256 of every other file
SUMMARY_FILE = "comparison.json"
CONFIG_FILE = "compare_config.json"
ANALYSIS_DIR = "crosscoder-analysis"
FLOP_FORMULAS = {
    "map_fit": "2·N_train·(d_A + d_B)² (the centered cross-product GEMM) + 4·N_heldout·d_A·d_B (held-out scoring)",
    "align": "2·n_A·d_A·d_B (carry A's decoder) + 2·n_A·n_B·d_B (cosine matrix) + 2·N·(d_A·n_A + d_B·n_B) "
             "(both SAE encoders over the statistics pass); the Hungarian solve is combinatorial and not counted",
    "crosscoder_train": "12·N_train·L·D (6 × tokens × encoder and decoder parameters, dense-equivalent; D = d_A + d_B) "
                        "+ 4·N_eval·L·D (final held-out evaluation)",
    "crosscoder_analyze": "4·N·L·D (one forward pass)",
}
FORMULAS = {
    "fve": "1 - sum_t ||x_t - xhat_t||^2 / sum_t ||x_t - mean_t x||^2 over the held-out tokens, pooled over dims "
           "(diffkit.metrics.ErrorSums; invariant to one scale factor, so raw and normalized units agree)",
    "bridge": "one-to-one assignment of live crosscoder latents to SAE features by cosine of decoder directions in "
              "that model's space; pairs below bridge_threshold are no match",
    "align_excl": "1 - similarity of the pair the assignment made (1 without a partner)",
    "cc_excl": "side a: n_A / (n_A + n_B) = 1 - r; side b: r = n_B / (n_A + n_B)",
    "precision": "|flagged by both| / |flagged by align| (the crosscoder's recall against align)",
    "recall": "|flagged by both| / |flagged by the crosscoder| (the crosscoder's precision against align)",
    "spearman_excl": "Spearman rank correlation of align_excl and cc_excl over features with a bridge partner",
    "precision_at_k": "|top-k by align_excl ∩ top-k by cc_excl| / k; chance = k / n",
    "consistent": "align-shared pair (i, j) whose features are bridged to the same crosscoder latent",
    "spearman_strength": "Spearman rank correlation of act_mass_log_ratio and (n_A - n_B) / (n_A + n_B) over "
                         "consistent pairs",
}


@dataclass(frozen=True)
class CompareConfig:
    """Options of a comparison (saved as ``compare_config.json`` beside its outputs)."""

    align: str
    crosscoder: str
    acts: str
    out: str
    split: str = "heldout"
    tokens: int = 200_000          # at most this many tokens of the split for analysis and FVE
    bridge_threshold: float = 0.5
    exclusive_r: float = 0.1
    top: int = 8                   # disagreements listed each way
    n_contexts: int = 3
    batch_size: int = 4096

    def __post_init__(self) -> None:
        if self.split not in ("heldout", "train", "all"):
            raise DiffkitError(f"unknown --split {self.split!r}: use heldout, train or all")
        if not -1.0 <= self.bridge_threshold <= 1.0:
            raise DiffkitError(f"--bridge-threshold is a cosine in [-1, 1], got {self.bridge_threshold}")
        if not 0 < self.exclusive_r < 0.5:
            raise DiffkitError(f"--exclusive-r must be between 0 and 0.5, got {self.exclusive_r}")
        if self.tokens <= 0 or self.top < 0 or self.batch_size <= 0:
            raise DiffkitError("--tokens and --batch-size must be positive, --top non-negative")


@dataclass
class Comparison:
    summary: dict
    bridge: Any            # pandas.DataFrame, columns in the module docstring
    curves: Any            # pandas.DataFrame: side, k, precision_at_k, chance


# -- inputs ---------------------------------------------------------------------------------------
def _fingerprint(manifest: dict) -> str:
    key = {"shards": manifest.get("shards"), "sources": manifest.get("sources")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def same_store(path: str | Path, store: Any) -> bool:
    """Whether ``path`` is ``store`` (same directory, or a store with identical shards and sources)."""
    from .activations import ActivationStore

    path = Path(path)
    if path.resolve() == Path(store.root).resolve():
        return True
    if not path.exists():
        return False
    try:
        return _fingerprint(ActivationStore.open(path).manifest) == _fingerprint(store.manifest)
    except DiffkitError:
        return False


def read_align_dir(path: str | Path, store: Any, acts: str | Path) -> tuple[dict, dict, Any]:
    """(config.json, summary.json, features table) of a FeatureDiff, checked against ``store``."""
    from .diff import load_diff_json, load_diff_meta, load_table

    path = Path(path)
    if not path.is_dir():
        raise DiffkitError(f"--align {path} is not a directory: pass the --out of `diffkit align`")
    table = load_table(path)
    meta = load_diff_meta(path)
    made_from = meta.get("inputs", {}).get("acts")
    if made_from is None or not same_store(made_from, store):
        raise DiffkitError(f"--align {path} was made from the store {made_from}, not --acts {acts}: pass --acts "
                           f"{made_from}, or run `diffkit align --acts {acts}` again")
    return meta, load_diff_json(path, "summary.json"), table


def check_crosscoder(path: str | Path, store: Any, acts: str | Path) -> dict:
    """The crosscoder's cfg.json, checked against the store (widths, hooks, normalization)."""
    from baselines.crosscoder.model import CFG_FILE, FORMAT_VERSION, KIND

    from .io import read_sealed_json

    path = Path(path)
    if not (path / CFG_FILE).exists():
        raise DiffkitError(f"--crosscoder {path} has no {CFG_FILE}: pass the --out of `diffkit crosscoder train`")
    cfg = read_sealed_json(path / CFG_FILE, KIND, FORMAT_VERSION, "train it again with `diffkit crosscoder train`")
    widths = (store.d_model("a"), store.d_model("b"))
    if tuple(cfg.get("d_in", ())) != widths:
        raise DiffkitError(f"--crosscoder {path} has widths {tuple(cfg.get('d_in', ()))}, the store {acts} {widths}: "
                           f"train one on this store (`diffkit crosscoder train --acts {acts}`)")
    hooks = (store.hook("a"), store.hook("b"))
    if tuple(cfg.get("hooks", hooks)) != hooks:
        raise DiffkitError(f"--crosscoder {path} was trained at hooks {tuple(cfg['hooks'])}, the store {acts} has "
                           f"{hooks}: train one on this store (`diffkit crosscoder train --acts {acts}`)")
    if not np.allclose(cfg.get("scale", ()), (store.scale("a"), store.scale("b")), rtol=1e-4):
        raise DiffkitError(f"--crosscoder {path} normalizes with {tuple(cfg.get('scale', ()))}, the store {acts} with "
                           f"{(store.scale('a'), store.scale('b'))}: it was trained on another store; train one on "
                           "this store")
    return cfg


# -- reconstruction and contexts -----------------------------------------------------------------------
def _sae_reconstruct(loaded: Any, x_raw: Any, scale: float) -> Any:
    """Encode and decode raw activations with an sae-lens SAE (its own normalizations), back in raw units."""
    import torch

    from .saes import SCALED_INPUT

    scaled = loaded.sae.cfg.normalize_activations == SCALED_INPUT
    with torch.no_grad():
        x = (x_raw * scale if scaled else x_raw).to(loaded.sae.W_enc.dtype)
        f = loaded.sae.encode(x)
        x_hat = loaded.sae.decode(f).float()
    return (x_hat / scale if scaled else x_hat), f


def sae_pass(store: Any, saes: dict, cfg: CompareConfig, progress: bool) -> dict:
    """FVE and L0 of each SAE on the comparison's split (at most ``cfg.tokens`` tokens)."""
    from .progress import tqdm

    from .metrics import ErrorSums

    sums = {s: ErrorSums.zeros(store.d_model(s)) for s in SIDES}
    l0 = {s: 0.0 for s in SIDES}
    n_batches = -(-min(cfg.tokens, store.n_tokens(cfg.split)) // cfg.batch_size)
    batches = store.iter_batches(cfg.batch_size, split=cfg.split, shuffle=False, drop_last=False, normalized=False)
    for _, (xa, xb) in zip(tqdm(range(n_batches), desc="SAE recon", disable=not progress), batches):
        for s, x in zip(SIDES, (xa, xb)):
            x_hat, f = _sae_reconstruct(saes[s], x, store.scale(s))
            sums[s].add(x.numpy(), x_hat.double().numpy())
            l0[s] += float((f > 0).sum())
    return {s: {"fve": sums[s].fve(), "l0": l0[s] / max(sums[s].n, 1), "tokens": sums[s].n} for s in SIDES}


def top_rows(store: Any, saes: dict, listed: dict, m: int, batch_size: int) -> dict:
    """The ``m`` top-activating rows (split ``all``) of the ``listed`` features of each SAE; −1-free arrays."""
    import torch

    idx = {s: torch.as_tensor(np.asarray(listed[s], dtype=np.int64)) for s in SIDES}
    top = {s: (torch.full((len(idx[s]), m), -1.0), torch.full((len(idx[s]), m), -1, dtype=torch.int64))
           for s in SIDES}
    row0 = 0
    if m and (len(idx["a"]) or len(idx["b"])):
        for xa, xb in store.iter_batches(batch_size, split="all", shuffle=False, drop_last=False, normalized=False):
            for s, x in zip(SIDES, (xa, xb)):
                if not len(idx[s]):
                    continue
                vals, rows = saes[s].encode(x, store.scale(s))[:, idx[s]].topk(min(m, len(x)), dim=0)
                all_v, all_r = torch.cat([top[s][0], vals.T], 1), torch.cat([top[s][1], (rows + row0).T], 1)
                keep = all_v.topk(m, dim=1).indices
                top[s] = (all_v.gather(1, keep), all_r.gather(1, keep))
            row0 += len(xa)
    return {s: {int(i): top[s][1][n][top[s][0][n] > 0].numpy() for n, i in enumerate(idx[s].tolist())}
            for s in SIDES}


def _listed(bridge: Any, top: int) -> dict:
    """The disagreements shown in the report: per side, align-only and crosscoder-only flags."""
    out = {}
    for side in SIDES:
        b = bridge[(bridge.side == side) & (bridge.latent >= 0)]
        align_only = b[b.align_flag & ~b.cc_flag].sort_values("cc_excl", kind="stable").head(top)
        cc_only = b[b.cc_flag & ~b.align_flag].sort_values("cc_excl", ascending=False, kind="stable").head(top)
        out[side] = {"align_only": align_only.feature.tolist(), "cc_only": cc_only.feature.tolist()}
    return out


# -- cost ------------------------------------------------------------------------------------------------
def cost(align_meta: dict, align_summary: dict, cc_dir: Path, cc_cfg: dict, store: Any, n_sae: dict,
         analysis: dict, analysis_seconds: float) -> dict:
    d_a, d_b = store.d_model("a"), store.d_model("b")
    n_a, n_b = n_sae["a"], n_sae["b"]
    map_dir = align_meta.get("inputs", {}).get("map")
    if map_dir and (Path(map_dir) / "map.json").exists():
        from .io import read_sealed_json
        from .linear_map import MAP_FORMAT_VERSION, MAP_KIND

        map_meta = read_sealed_json(Path(map_dir) / "map.json", MAP_KIND, MAP_FORMAT_VERSION,
                                    f"fit it again with `diffkit fit-map --out {map_dir}`")
    else:
        map_meta = {}
    n_train = map_meta.get("n_train", store.n_tokens("train"))
    n_held = map_meta.get("n_heldout", store.n_tokens("heldout"))
    n_stats = align_summary.get("tokens", 0)
    ts = json.loads((cc_dir / "train_summary.json").read_text()) if (cc_dir / "train_summary.json").exists() else {}
    L, D = cc_cfg["dict_size"], sum(cc_cfg["d_in"])
    n_cc, n_eval = ts.get("tokens", float("nan")), ts.get("heldout", {}).get("tokens", 0)
    rows = {
        "map_fit": {"seconds": map_meta.get("fit_seconds", float("nan")),
                    "flops": 2.0 * n_train * (d_a + d_b) ** 2 + 4.0 * n_held * d_a * d_b,
                    "tokens": n_train},
        "align": {"seconds": align_summary.get("seconds", {}).get("total", float("nan")),
                  "flops": 2.0 * n_a * d_a * d_b + 2.0 * n_a * n_b * d_b + 2.0 * n_stats * (d_a * n_a + d_b * n_b),
                  "tokens": n_stats},
        "crosscoder_train": {"seconds": ts.get("seconds", float("nan")),
                             "flops": 12.0 * n_cc * L * D + 4.0 * n_eval * L * D, "tokens": n_cc},
        "crosscoder_analyze": {"seconds": analysis_seconds, "flops": 4.0 * analysis["tokens"] * L * D,
                               "tokens": analysis["tokens"]},
    }
    total = {m: {"seconds": sum(rows[k]["seconds"] for k in ks), "flops": sum(rows[k]["flops"] for k in ks)}
             for m, ks in (("align", ("map_fit", "align")), ("crosscoder", ("crosscoder_train", "crosscoder_analyze")))}
    return {"stages": rows, "total": total, "formulas": FLOP_FORMULAS,
            "note": "SAE training is not counted: the training-free diff takes pretrained SAEs as given"}


# -- the command ------------------------------------------------------------------------------------------
def compare(cfg: CompareConfig, progress: bool = False, log=lambda _: None) -> Comparison:
    """Run the comparison (module docstring) and write it to ``cfg.out``."""
    import torch

    from baselines.crosscoder.analysis import AnalyzeConfig, analyze, load_latents
    from baselines.crosscoder.model import load as load_crosscoder

    from .activations import ActivationStore
    from .diff import decode_contexts, store_tokenizer
    from .saes import check_against_store, load_sae

    if not Path(cfg.acts).exists():
        raise DiffkitError(f"--acts {cfg.acts} does not exist: pass the --out of `diffkit collect`")
    store = ActivationStore.open(cfg.acts)
    if store.n_tokens(cfg.split) == 0:
        raise DiffkitError(f"the store {cfg.acts} has no {cfg.split} tokens: pass --split train or all")
    align_meta, align_summary, align_table = read_align_dir(cfg.align, store, cfg.acts)
    cc_dir = Path(cfg.crosscoder)
    cc_cfg = check_crosscoder(cc_dir, store, cfg.acts)
    specs = {s: align_meta["inputs"][f"sae_{s}"] for s in SIDES}
    saes = {s: load_sae(specs[s]) for s in SIDES}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in SIDES:
            check_against_store(saes[s], store, s)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DiffkitError(f"--out {out} is a file: pass a directory path")
    out.mkdir(parents=True, exist_ok=True)
    if (out / SUMMARY_FILE).exists():
        (out / SUMMARY_FILE).unlink()  # written last: its presence marks a complete comparison
    from .io import atomic_write_bytes, atomic_write_json

    atomic_write_json(out / CONFIG_FILE, {"kind": COMPARE_KIND, "format_version": COMPARE_FORMAT_VERSION,
                                          "config": asdict(cfg)})
    t0 = time.perf_counter()
    log("crosscoder analysis")
    analysis = analyze(AnalyzeConfig(crosscoder=str(cc_dir), acts=str(cfg.acts), out=str(out / ANALYSIS_DIR),
                                     split=cfg.split, tokens=cfg.tokens, exclusive_r=cfg.exclusive_r,
                                     n_contexts=cfg.n_contexts), progress=progress)
    analysis_seconds = time.perf_counter() - t0
    latents = load_latents(out / ANALYSIS_DIR)
    model = load_crosscoder(cc_dir)
    blocks = [w.double().numpy() for w in model.split(model.W_dec_LD.detach())]
    live = np.nonzero(~latents["dead"].to_numpy())[0]
    if len(live) == 0:
        raise DiffkitError(f"no latent of --crosscoder {cc_dir} fired on the {cfg.split} split: train it longer or "
                           "pass --split all")
    t1 = time.perf_counter()
    lat, cos = {}, {}
    for m, s in enumerate(SIDES):
        lat[s], cos[s] = bridge_side(blocks[m], live, saes[s].W_dec.double().numpy(), cfg.bridge_threshold)
    n_sae = {s: saes[s].d_sae for s in SIDES}
    bridge = bridge_table(align_table, latents, lat, cos, n_sae)
    scores, curves = agreement(bridge, align_table)
    bridge_seconds = time.perf_counter() - t1
    listed = _listed(bridge, cfg.top)
    log("SAE reconstruction on the same tokens")
    with torch.no_grad():
        recon = sae_pass(store, saes, cfg, progress)
        rows = top_rows(store, saes, {s: listed[s]["align_only"] + listed[s]["cc_only"] for s in SIDES},
                        cfg.n_contexts, cfg.batch_size)
    tok = store_tokenizer(store)
    contexts = {s: {str(i): decode_contexts(store, r, "all", tok) for i, r in rows[s].items()} for s in SIDES}
    summary = {
        "kind": COMPARE_KIND, "format_version": COMPARE_FORMAT_VERSION, "config": asdict(cfg),
        "inputs": {"align": str(cfg.align), "crosscoder": str(cc_dir), "acts": str(cfg.acts),
                   "sae_a": specs["a"], "sae_b": specs["b"]},
        "store": {"model_a": store.manifest["sources"]["a"].get("spec"),
                  "model_b": store.manifest["sources"]["b"].get("spec"),
                  "hook_a": store.hook("a"), "hook_b": store.hook("b"),
                  "d_a": store.d_model("a"), "d_b": store.d_model("b"),
                  "tokens": {sp: store.n_tokens(sp) for sp in ("all", "train", "heldout")}},
        "saes": {s: {"spec": specs[s], "describe": saes[s].describe(), "d_sae": saes[s].d_sae} for s in SIDES},
        "crosscoder": {"arch": cc_cfg["arch"], "dict_size": cc_cfg["dict_size"], "k": cc_cfg.get("k"),
                       "train": _train_info(cc_dir)},
        "analysis": {k: analysis[k] for k in ("tokens", "fve_a", "fve_b", "l0", "dead_frac", "counts",
                                               "sharedness", "thresholds", "calibration") if k in analysis},
        "align": {k: align_summary[k] for k in ("counts", "threshold", "map", "similarity_quantiles", "tokens",
                                                "calibration") if k in align_summary},
        "agreement": scores,
        "reconstruction": {"split": cfg.split, "sae": recon,
                           "map": {d: align_summary["map"]["scores"][d]["heldout_fve"] for d in ("a_to_b", "b_to_a")},
                           "crosscoder": {"fve_a": analysis["fve_a"], "fve_b": analysis["fve_b"], "l0": analysis["l0"],
                                          "tokens": analysis["tokens"]}},
        "cost": cost(align_meta, align_summary, cc_dir, cc_cfg, store, n_sae, analysis, analysis_seconds),
        "listed": listed, "contexts": contexts, "formulas": FORMULAS,
        "seconds": {"analysis": analysis_seconds, "bridge": bridge_seconds, "total": time.perf_counter() - t0},
    }
    import io

    from .io import sha256_bytes, sha256_file, write_sealed_json

    buf = io.BytesIO()
    bridge.to_parquet(buf, index=False)
    files = {"bridge.csv": bridge.to_csv(index=False).encode(), "bridge.parquet": buf.getvalue(),
             "precision_at_k.csv": curves.to_csv(index=False).encode()}
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    summary = {**_clean(summary), "sha256": {**{k: sha256_bytes(v) for k, v in files.items()},
                                             CONFIG_FILE: sha256_file(out / CONFIG_FILE)}}
    write_sealed_json(out / SUMMARY_FILE, summary)  # sealed, with every other file's sha256; written last
    return Comparison(summary, bridge, curves)


def _train_info(cc_dir: Path) -> dict:
    info = {}
    if (cc_dir / "train_summary.json").exists():
        ts = json.loads((cc_dir / "train_summary.json").read_text())
        info.update({"tokens": ts.get("tokens"), "steps": ts.get("steps"), "seconds": ts.get("seconds")})
    if (cc_dir / "train_config.json").exists():
        tc = json.loads((cc_dir / "train_config.json").read_text())
        info.update({k: tc.get(k) for k in ("batch_size", "lr", "seed")})
    return info


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def load_comparison(path: str | Path) -> Comparison:
    """Read a comparison written by :func:`compare` (``comparison.json`` marks it complete)."""
    import pandas as pd

    path = Path(path)
    if not (path / SUMMARY_FILE).exists():
        raise DiffkitError(f"{path} is not a complete comparison (no {SUMMARY_FILE}): run `diffkit compare --out {path}`")
    from .io import read_sealed_json, verify_sha256

    fix = f"run `diffkit compare --out {path}` again"
    summary = read_sealed_json(path / SUMMARY_FILE, COMPARE_KIND, COMPARE_FORMAT_VERSION, fix)
    sums = summary.get("sha256") if isinstance(summary.get("sha256"), dict) else {}
    for name in ("bridge.parquet", "precision_at_k.csv"):
        verify_sha256(path / name, sums.get(name), fix)
    return Comparison(summary, pd.read_parquet(path / "bridge.parquet"), pd.read_csv(path / "precision_at_k.csv"))
