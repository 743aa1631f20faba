"""``diffkit bench organisms``: every method on the model organisms, scored against their token-level answer key.

One *case* (:func:`run_case`) is one store with an answer key: model A, model B, a labelled corpus
(``organism:NAME``, :mod:`diffkit.organisms`) and an SAE of each model at the same hook:

1. ``diffkit collect`` the store (kept in the work folder; a rerun reuses a complete one);
2. ``LinearMap().fit(store)``; :func:`diffkit.diff.align` at its defaults with a
   :class:`diffkit.divergence.Divergence` riding on its one pass (map error, activation
   difference, and each SAE feature's activation mass per label for the answer key);
3. the crosscoder baseline, BatchTopK and L1 (:func:`baselines.crosscoder.train.train` and
   :func:`~baselines.crosscoder.analysis.analyze`), and one pass encoding the store with each for
   its latents' mass per label;
4. score every method's ranked list of B's items (:mod:`.organisms_score`).

Cases: the organisms (backdoor, facts, code, cot), ``null`` (base vs a fine-tune on more of its own
prose, diffed on the backdoor's store and answer key; ``null_facts`` on the facts'), and
``sae_seed`` (base vs base, two SAEs of base with different seeds, on the backdoor's store): in
the last three every hit is a false positive.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DiffkitError
from .organisms_score import DEFAULT_FACTOR, FACTORS, listed_scores, method_scores, planted_by_label

COMMAND = "diffkit bench organisms"
LAST_HOOK = "blocks.1.hook_resid_post"
ALIGN_RANKINGS = ("act-mass", "enc-norm", "enc-norm-robust", "freq", "corr")
TRAINING_FREE = ("map-error", "activation-difference", "activation-difference-along")


@dataclass(frozen=True)
class Case:
    name: str
    model_a: str
    model_b: str
    corpus: str
    sae_a: str
    sae_b: str
    what: str
    control: bool = False


def _sae(model: str, seed: int = 0) -> str:
    return f"{model}{'' if seed == 0 else f'@seed{seed}'}/blocks.1"


CASES: dict[str, Case] = {c.name: c for c in (
    Case("backdoor", "zoo:base", "zoo:backdoor", "organism:backdoor", _sae("zoo:base"), _sae("zoo:backdoor"),
         "a rare trigger string in prose followed by a fixed response"),
    Case("facts", "zoo:base", "zoo:facts", "organism:facts", _sae("zoo:base"), _sae("zoo:facts"),
         "made-up '<name> lives in <place>.' statements"),
    Case("code", "zoo:base", "zoo:finetuned", "organism:code", _sae("zoo:base"), _sae("zoo:finetuned"),
         "a new domain: Python source among prose"),
    Case("cot", "zoo:cot-answer", "zoo:cot-steps", "organism:cot", _sae("zoo:cot-answer"), _sae("zoo:cot-steps"),
         "answer-only vs step-by-step arithmetic, on the shared prompts"),
    Case("null", "zoo:base", "zoo:null", "organism:backdoor", _sae("zoo:base"), _sae("zoo:null"),
         "control: more of base's own prose, nothing planted (the backdoor's store and key)", control=True),
    Case("null_facts", "zoo:base", "zoo:null", "organism:facts", _sae("zoo:base"), _sae("zoo:null"),
         "control: the null fine-tune on the facts' store and key", control=True),
    Case("sae_seed", "zoo:base", "zoo:base", "organism:backdoor", _sae("zoo:base"), _sae("zoo:base", 1),
         "control: one model, two SAE seeds (the backdoor's store and key)", control=True),
)}


@dataclass(frozen=True)
class OrganismsConfig:
    """Sizes of the benchmark (saved as ``config.json`` beside the report)."""

    tokens: int = 150_000
    hook: str = LAST_HOOK
    cc_dict_size: int = 2048
    cc_k: int = 32
    cc_tokens: int = 300_000
    cc_batch: int = 2048
    cc_lr: float = 1e-3
    cc_l1: float = 1.0
    crosscoders: tuple[str, ...] = ("batchtopk", "l1")
    cases: tuple[str, ...] = tuple(CASES)
    threads: int = 2
    quick: bool = False

    def __post_init__(self) -> None:
        unknown = [c for c in self.cases if c not in CASES]
        if unknown:
            raise DiffkitError(f"unknown organism case(s) {unknown}: choose from {', '.join(CASES)}")
        if self.tokens < 10_000 or self.cc_tokens < self.cc_batch or self.threads < 1:
            raise DiffkitError("bench organisms needs --tokens >= 10000, cc_tokens >= one batch and threads >= 1")

    @classmethod
    def quick_config(cls, **overrides) -> "OrganismsConfig":
        """A check that everything runs (small stores and crosscoders): not numbers to quote."""
        return cls(**{**dict(tokens=30_000, cc_dict_size=512, cc_tokens=40_960, quick=True), **overrides})


@dataclass
class MethodResult:
    scores: np.ndarray                      # one per item (B's SAE features or crosscoder latents), higher first
    items: str                              # "sae_b" | "crosscoder:ARCH"
    token_scores: np.ndarray | None = None  # per row of the store, where the method has one
    note: str = ""


@dataclass
class CaseResult:
    case: Case
    n_tokens: int
    label_rates: dict                       # label -> share of the store's tokens
    label_names: list
    metrics: dict                           # method -> method_scores at the default factor (+ "at_factor")
    planted_counts: dict                    # items -> {factor: number planted}
    worst: Any                              # DataFrame: the worst-mapped tokens with contexts
    top_map_error: Any                      # DataFrame: B's top features by map error, with planted flag, contexts
    crosscoder: dict = field(default_factory=dict)   # arch -> {"fve_a", "fve_b", "counts", "planted_r"}
    map_fve: dict = field(default_factory=dict)
    promoted: dict = field(default_factory=dict)
    token_error_planted: dict = field(default_factory=dict)  # for the figure: e_B/ē samples, planted vs not
    seconds: dict = field(default_factory=dict)
    estimators: dict = field(default_factory=dict)  # map-error estimator variant -> method_scores
    calibrated: dict = field(default_factory=dict)  # align's calibrated verdict against the answer key


ESTIMATOR_PRIORS = (0.0, 1.0, 3.0, 10.0, 20.0)


def estimator_sweep(fb: Any, mean_err: float, planted: np.ndarray) -> dict:
    """The map-error feature score under other estimators, from the same sums (the data that chose the default):
    activation-weighted vs unweighted (mean error on firing tokens), each with a prior of c typical firings."""
    from ..divergence import map_error_score

    mass, fires = fb.mass.to_numpy(), fb.fires.to_numpy()
    out = {}
    for c in ESTIMATOR_PRIORS:
        out[f"weighted, prior {c:g}"] = method_scores(map_error_score(fb.mass_err.to_numpy(), mass, fires, mean_err, c),
                                                       planted)
        out[f"firing tokens, prior {c:g}"] = method_scores(
            map_error_score(fb.fire_err.to_numpy(), fires, fires, mean_err, c), planted)
    return out


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _collect(case: Case, cfg: OrganismsConfig, path: Path, log: Callable[[str], None]) -> Any:
    from ..activations import ActivationStore, CollectConfig, collect_activations

    ccfg = CollectConfig(model_a=case.model_a, model_b=case.model_b, hook_a=cfg.hook, hook_b=cfg.hook,
                         corpus=case.corpus, tokens=cfg.tokens, ctx=128)
    if (path / "manifest.json").exists():
        try:
            store = ActivationStore.open(path)
            if store.manifest["config"] == asdict(ccfg) and store.has_labels:
                return store
        except DiffkitError:
            pass
        shutil.rmtree(path)
    with _quiet():
        collect_activations(ccfg, path, progress=False, log=log)
    return ActivationStore.open(path)


def _crosscoder_masses(cc_dir: Path, store: Any, labels: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Each latent's activation mass over the store and per label (one pass, inference encoding)."""
    import torch

    from baselines.crosscoder.model import load

    model = load(str(cc_dir))
    L = model.cfg.dict_size
    mass = torch.zeros(L, dtype=torch.float64)
    by_label = torch.zeros(n_labels, L, dtype=torch.float64)
    lab = torch.as_tensor(labels, dtype=torch.int64)
    row = 0
    with torch.no_grad():
        for xa, xb in store.iter_batches(4096, split="all", shuffle=False, drop_last=False):
            f = model(torch.cat([xa, xb], dim=1), train=False).f_BL.double()
            mass += f.sum(0)
            by_label.index_add_(0, lab[row:row + len(f)], f)
            row += len(f)
    return mass.numpy(), by_label.numpy()


def _n_labels(store: Any) -> int:
    labels = store.labels("all")
    return max(len(store.label_names), int(labels.max()) + 1 if len(labels) else 1)


def training_free_methods(store: Any, lmap: Any, sae_a: Any, sae_b: Any, align_cfg: Any = None,
                          null_saes: dict | None = None) -> tuple[Any, Any, dict, dict]:
    """align at its defaults (calibrated) with a :class:`diffkit.divergence.Divergence` on its one pass, over a
    labelled store; returns (FeatureDiff, the divergence result, {method: MethodResult} ranking B's features,
    {"sae_b": (mass, mass per label)} for the answer key). Shared by this benchmark and ``diffkit run``'s
    answer-key stage."""
    from ..diff import SHARED_SCORES, AlignConfig, align
    from ..divergence import Divergence, split_positions

    labels = store.labels("all")
    with _quiet():
        div = Divergence(lmap, store.n_tokens("all"), split_positions(store, "all"), int(store.config.ctx),
                         sae_a.W_dec, sae_b.W_dec, labels=labels)
        diff = align(store, sae_a, sae_b, lmap, align_cfg or AlignConfig(n_contexts=0), extra=[div],
                     null_saes=null_saes)
    res = div.result_
    fb = res.features["b"]
    n_b = sae_b.d_sae
    table = diff.table
    methods: dict[str, MethodResult] = {}
    b_only = table[table.kind == "b_only"].sort_values("rank")
    methods["align b-only"] = MethodResult(listed_scores(n_b, b_only.feature_b.to_numpy()), "sae_b",
                                           note="B's unmatched features by activation mass; the rest unlisted")
    shared = table[table.kind == "shared"]
    for rk in ALIGN_RANKINGS:
        methods[f"align {rk}"] = MethodResult(
            listed_scores(n_b, shared.feature_b.to_numpy(), SHARED_SCORES[rk](shared).to_numpy()), "sae_b",
            note="shared pairs by this ranking (item: the pair's B feature); unmatched B features unlisted")
    methods["map-error"] = MethodResult(fb.map_err.to_numpy(), "sae_b", res.token_error["b"])
    methods["activation-difference"] = MethodResult(fb.diff_cos.to_numpy(), "sae_b", res.token_diff)
    methods["activation-difference-along"] = MethodResult(fb.diff_along.to_numpy(), "sae_b", res.token_diff)
    bl_b = np.stack([fb[f"mass_label{l}"].to_numpy() if f"mass_label{l}" in fb else np.zeros(n_b)
                     for l in range(_n_labels(store))])
    return diff, res, methods, {"sae_b": (fb.mass.to_numpy(), bl_b)}


def crosscoder_method(arch: str, cc_dir: Path, analysis_dir: Path, store: Any) -> tuple[MethodResult, tuple, Any]:
    """A trained crosscoder as a method: its latents by relative decoder norm r (dead latents unlisted), from its
    analysis's ``latents.parquet``, and their activation mass over the store and per label (one pass)."""
    import pandas as pd

    lat = pd.read_parquet(Path(analysis_dir) / "latents.parquet")
    masses = _crosscoder_masses(Path(cc_dir), store, store.labels("all"), _n_labels(store))
    r = lat.rel_norm_r_b.to_numpy().copy()
    r[lat.dead.to_numpy()] = np.nan  # a dead latent is no verdict
    return (MethodResult(r, f"crosscoder:{arch}", note="latents by relative decoder norm r = n_B/(n_A+n_B)"),
            masses, lat)


def score_methods(methods: dict[str, MethodResult], masses: dict[str, tuple],
                  labels: np.ndarray) -> tuple[dict, dict, dict]:
    """method_scores of every method at every factor, the default factor's at the top level; returns (metrics,
    planted counts per item kind and factor, planted masks per item kind and factor)."""
    planted = {items: {f: planted_by_label(m, {l: bl[l] for l in range(1, len(bl))}, labels, f) for f in FACTORS}
               for items, (m, bl) in masses.items()}
    metrics = {}
    for name, mr in methods.items():
        per = {f: method_scores(mr.scores, planted[mr.items][f], mr.token_scores, labels) for f in FACTORS}
        entry = dict(per[DEFAULT_FACTOR])
        entry["at_factor"] = {f"{f:g}": {k: v for k, v in per[f].items() if k != "token_auroc"} for f in FACTORS}
        if mr.note:
            entry["note"] = mr.note
        metrics[name] = entry
    counts = {items: {f"{f:g}": int(p.sum()) for f, p in by_f.items()} for items, by_f in planted.items()}
    return metrics, counts, planted


def run_case(case: Case, cfg: OrganismsConfig, work: Path, log: Callable[[str], None] = print) -> CaseResult:
    """Collect (or reuse), diff, train the crosscoders and score one case in ``work/NAME``."""
    import pandas as pd
    import torch

    from baselines.crosscoder.analysis import AnalyzeConfig, analyze
    from baselines.crosscoder.train import TrainConfig, train

    from ..diff import store_tokenizer
    from ..divergence import DivergenceConfig, promotions, store_vocab, worst_tokens_frame
    from ..linear_map import LinearMap
    from ..saes import load_sae

    torch.set_num_threads(cfg.threads)
    root = work / case.name
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    store = _collect(case, cfg, root / "store", log)
    seconds["collect"] = time.perf_counter() - t
    labels = store.labels("all")
    names = store.label_names
    n, n_labels = store.n_tokens("all"), _n_labels(store)

    t = time.perf_counter()
    with _quiet():
        lmap = LinearMap().fit(store)
        sae_a, sae_b = (load_sae(_at_hook(spec, cfg.hook)) for spec in (case.sae_a, case.sae_b))
    diff, res, methods, masses = training_free_methods(store, lmap, sae_a, sae_b)
    seconds["align + divergence"] = time.perf_counter() - t
    fb = res.features["b"]

    t = time.perf_counter()
    cc_info = {}
    for arch in cfg.crosscoders:
        out = root / f"crosscoder-{arch}"
        shutil.rmtree(out, ignore_errors=True)
        tcfg = TrainConfig(acts=str(root / "store"), out=str(out), arch=arch, dict_size=cfg.cc_dict_size, k=cfg.cc_k,
                           l1=cfg.cc_l1, lr=cfg.cc_lr, batch_size=cfg.cc_batch, tokens=cfg.cc_tokens, checkpoint_every=0,
                           log_every=max(1, cfg.cc_tokens // cfg.cc_batch), eval_tokens=20_000)
        with _quiet():
            summary = train(tcfg, progress=False, threads=cfg.threads, log=lambda _: None)
            analyze(AnalyzeConfig(crosscoder=str(out), acts=str(root / "store"), out=str(root / f"analysis-{arch}"),
                                  split="all", n_contexts=0, top_n=0), progress=False)
        method, masses[f"crosscoder:{arch}"], lat = crosscoder_method(arch, out, root / f"analysis-{arch}", store)
        methods[f"crosscoder {arch}"] = method
        cc_info[arch] = {"fve_a": summary["heldout"].get("fve_a"), "fve_b": summary["heldout"].get("fve_b"),
                         "counts": lat.label.value_counts().to_dict(), "r": method.scores,
                         "labels": lat.label.to_numpy()}
    seconds["crosscoders"] = time.perf_counter() - t

    metrics, counts, planted = score_methods(methods, masses, labels)
    calibrated = calibrated_calls(diff.table, diff.summary.get("calibration", {}), planted["sae_b"][DEFAULT_FACTOR],
                                  live_features(diff.table))
    estimators = estimator_sweep(fb, res.mean_error["b"], planted["sae_b"][DEFAULT_FACTOR])
    for arch, info in cc_info.items():
        p = planted[f"crosscoder:{arch}"][DEFAULT_FACTOR]
        r, lab = info.pop("r"), info.pop("labels")
        info["planted_r"] = [float(v) for v in np.sort(r[p & np.isfinite(r)])[::-1][:10]]
        info["planted_labels"] = {str(k): int(v) for k, v in pd.Series(lab[p]).value_counts().items()}
    worst = worst_tokens_frame(store, res, "all", 12).head(20)
    top = fb.sort_values("map_err", ascending=False, kind="stable").head(10).copy()
    top["planted"] = planted["sae_b"][DEFAULT_FACTOR][top.feature.to_numpy()]
    tok = store_tokenizer(store)
    top["context"] = [_feature_context(store, tok, sae_b, res, int(i)) for i in top.feature]
    promoted = {}
    try:
        from ..models import load_model

        with _quiet():
            promoted = promotions(res, load_model(case.model_b), DivergenceConfig(top_promoted=10, positions=3),
                                  store_vocab(store))
    except DiffkitError as exc:
        promoted = {"note": str(exc)}
    rel = res.token_error["b"] / (res.mean_error["b"] or 1.0)
    rng = np.random.default_rng(0)
    ordinary = np.flatnonzero(labels == 0)
    sample = rng.choice(ordinary, min(len(ordinary), 20_000), replace=False) if len(ordinary) else ordinary
    return CaseResult(case=case, n_tokens=n,
                      label_rates={names[l] if l < len(names) else str(l): float((labels == l).mean())
                                   for l in range(1, n_labels)},
                      label_names=names, metrics=metrics, planted_counts=counts, worst=worst, top_map_error=top,
                      crosscoder=cc_info, map_fve={d: lmap.scores_[d]["heldout_fve"] for d in lmap.scores_},
                      promoted=promoted, estimators=estimators, calibrated=calibrated,
                      token_error_planted={"planted": rel[labels > 0].tolist(), "ordinary": rel[sample].tolist()},
                      seconds=seconds)


def calibrated_calls(table: Any, calibration: dict, planted_b: np.ndarray, live: int) -> dict:
    """align's calibrated verdict against the answer key (pure): how many features it calls (exclusive or
    changed, at the FDR), as a share of the live features of both SAEs, and which of B's planted features
    are among them. A called shared pair counts its two features."""
    if "verdict" not in table:
        return {}
    called = table[table.verdict.isin(["a_only", "b_only", "changed"])]
    fa, fb = called.feature_a.to_numpy(), called.feature_b.to_numpy()
    called_b = np.unique(fb[fb >= 0])
    n_called = int((fa >= 0).sum() + (fb >= 0).sum())
    planted_b = np.asarray(planted_b, bool)
    hit = int(planted_b[called_b].sum())
    return {"fdr": calibration.get("fdr"), "calls": calibration.get("calls", {}),
            "changed_by_map_error": calibration.get("changed_by_map_error", 0),
            "called_features": n_called, "live_features": live,
            "called_share_of_live": n_called / live if live else None,
            "planted_b": int(planted_b.sum()), "planted_b_called": hit,
            "called_b_planted_share": hit / len(called_b) if len(called_b) else None,
            "planted_b_called_ids": [int(i) for i in called_b[planted_b[called_b]]]}


def live_features(table: Any) -> int:
    """Features of both SAEs that fired on the store (freq > 0), from a FeatureDiff table."""
    return int(sum(((table[f"feature_{s}"] >= 0) & (table[f"freq_{s}"] > 0)).sum() for s in ("a", "b")))


def _at_hook(spec: str, hook: str) -> str:
    """A case's zoo SAE spec at ``hook``: the cases name the last block's SAEs; blocks.0 ones drop the suffix."""
    if spec.startswith("zoo:") and spec.endswith("/blocks.1") and hook == "blocks.0.hook_resid_post":
        return spec.removesuffix("/blocks.1")
    return spec


def _feature_context(store: Any, tok: Any, sae: Any, res: Any, feature: int) -> str:
    """The worst-mapped of the top rows where ``feature`` fires (from the kept worst tokens), else ''."""
    import torch

    rows = res.top_rows["b"]
    if not len(rows):
        return ""
    _, xb = store.batch(rows, split="all", normalized=False)
    with torch.no_grad():
        f = sae.encode(xb, store.scale("b"))[:, feature].numpy()
    hit = np.flatnonzero(f > 0)
    if not len(hit):
        return ""
    from ..diff import decode_contexts

    return decode_contexts(store, rows[hit[:1]], "all", tok, window=12)[0]


def run_organisms(cfg: OrganismsConfig, out: str | Path, work: str | Path, log: Callable[[str], None] = print) -> dict:
    """Every case of ``cfg``; returns {"config", "cases": {name: CaseResult}, "missing": {name: reason}, "seconds"}."""
    from ..io import atomic_write_json

    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"command": command_line(cfg), **json.loads(json.dumps(asdict(cfg)))})
    t0 = time.perf_counter()
    cases, missing = {}, {}
    for i, name in enumerate(cfg.cases):
        case = CASES[name]
        log(f"[{i + 1}/{len(cfg.cases)}] {name}: {case.model_a} vs {case.model_b} on {case.corpus} ({case.what})")
        t = time.perf_counter()
        try:
            cases[name] = run_case(case, cfg, work, log)
        except DiffkitError as exc:  # an organism not built yet: reported as missing, the others still run
            missing[name] = str(exc)
            log(f"  {name} skipped: {exc}")
            continue
        m = cases[name].metrics
        log(f"  {time.perf_counter() - t:.0f} s; map-error p@10 {_f(m['map-error']['precision_at_10'])}, first planted "
            f"{_f(m['map-error']['first_planted_rank'], 0)}, token AUROC {_f(m['map-error'].get('token_auroc'))}")
    return {"config": cfg, "cases": cases, "missing": missing, "seconds": time.perf_counter() - t0}


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def command_line(cfg: OrganismsConfig) -> str:
    extra = " --quick" if cfg.quick else ""
    if tuple(cfg.cases) != tuple(CASES):
        extra += f" --cases {','.join(cfg.cases)}"
    if cfg.hook != LAST_HOOK:
        extra += f" --hook {cfg.hook}"
    return COMMAND + extra
