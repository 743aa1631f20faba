"""``diffkit bench groundtruth``: both methods on planted pairs, scored against the known answer.

One *case* (:func:`run_case`) is the whole product on a planted pair (:mod:`diffkit.synthetic`):

1. draw the pair and write it as a real :class:`~diffkit.activations.ActivationStore`;
2. run the packaged ``groundtruth`` pipeline config on it (:mod:`diffkit.pipeline`, ``data.store`` = that
   store, sizes from :func:`case_overrides`): a TopK SAE per side (sae-lens's own trainer on the store's
   raw train batches, seeds ``seed`` and ``seed + 1``), the map and :func:`diffkit.diff.align` at its
   defaults, the BatchTopK crosscoder on the same store, and the comparison (which runs the
   crosscoder's ``analyze`` for its relative norms and labels, over every token);
3. score the saved artifacts against the answer key (:mod:`.groundtruth_score`).

:func:`run_groundtruth` runs the main case, the seed-pair negative control (no exclusive or
changed features, SAEs of different seeds) and the difficulty sweep (fraction exclusive, noise,
superposition ratio), one case per point; :mod:`.groundtruth_report` writes the report.
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
from typing import Callable

from ..errors import DiffkitError
from ..synthetic import PlantedConfig, make_planted, planted_config, write_planted_store
from .groundtruth_score import CaseScores, score_case

COMMAND = "diffkit bench groundtruth"
AXES = ("frac_exclusive", "noise", "superposition")


@dataclass(frozen=True)
class GroundTruthConfig:
    """Everything a run depends on (saved as ``config.json`` beside the report before the first case)."""

    d: int = 64                     # width of both planted models
    superposition: float = 4.0      # planted features per dimension
    frac_exclusive: float = 0.125   # of each model's features, its own
    frac_changed: float = 0.1       # of the shared features, changed in strength in B
    change_factor: float = 2.0
    k: float = 4.0                  # mean active planted features per token (A)
    noise: float = 0.1
    n_tokens: int = 32_768
    sae_width: float = 1.5          # SAE latents per planted feature of its model
    sae_steps: int = 1200
    sae_batch: int = 256
    sae_lr: float = 1e-2
    cc_width: float = 1.5           # crosscoder latents per planted feature of the pair (shared counted once)
    cc_steps: int = 1500
    cc_batch: int = 256
    cc_lr: float = 2e-3
    recover_threshold: float = 0.9  # decoder cosine for a latent to count as recovering a planted feature
    sweep_frac_exclusive: tuple[float, ...] = (0.05, 0.125, 0.25, 0.5)
    sweep_noise: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0)
    sweep_superposition: tuple[float, ...] = (2.0, 4.0, 8.0, 12.0)
    seed: int = 0
    threads: int = 2
    quick: bool = False

    def __post_init__(self) -> None:
        if self.d < 4 or self.superposition <= 0 or self.n_tokens < 2048:
            raise DiffkitError("groundtruth needs --d ≥ 4, a positive superposition and ≥ 2048 tokens")
        if min(self.sae_steps, self.cc_steps, self.sae_batch, self.cc_batch, self.threads) < 1:
            raise DiffkitError("groundtruth steps, batch sizes and threads must be positive")
        if not 0 < self.recover_threshold < 1:
            raise DiffkitError(f"recover_threshold is a cosine in (0, 1), got {self.recover_threshold}")
        for name in AXES:
            if not getattr(self, f"sweep_{name}"):
                raise DiffkitError(f"sweep_{name} needs at least one value")

    @classmethod
    def quick_config(cls, **overrides) -> "GroundTruthConfig":
        """Small and fast (about a minute): a check that everything runs, not numbers to quote."""
        return cls(**{**dict(d=32, n_tokens=16_384, sae_steps=800, cc_steps=1500, sweep_frac_exclusive=(0.125, 0.3),
                             sweep_noise=(0.1, 0.5), sweep_superposition=(2.0, 6.0), quick=True), **overrides})

    def planted(self, **overrides) -> PlantedConfig:
        """The planted pair of the main case, with sweep overrides (``frac_exclusive``, ``noise``, ``superposition``)."""
        o = {"superposition": self.superposition, "frac_exclusive": self.frac_exclusive,
             "frac_changed": self.frac_changed, "noise": self.noise, **overrides}
        return planted_config(d=self.d, superposition=o["superposition"], frac_exclusive=o["frac_exclusive"],
                              frac_changed=o["frac_changed"], change_factor=self.change_factor, k=self.k,
                              noise=o["noise"], n_tokens=self.n_tokens, ctx=64, seed=self.seed)


@dataclass
class CaseResult:
    name: str
    planted: PlantedConfig
    scores: CaseScores
    seconds: dict = field(default_factory=dict)
    sae_fvu: dict = field(default_factory=dict)
    cc_fve: dict = field(default_factory=dict)
    map_fve: float = float("nan")


@dataclass
class GroundTruthResult:
    config: GroundTruthConfig
    main: CaseResult
    control: CaseResult
    sweep: dict[str, list[tuple[float, CaseResult]]]
    seconds: float = 0.0


@contextlib.contextmanager
def _quiet(progress: bool):
    """Silence sae-lens's and the crosscoder's own progress bars unless asked for them."""
    if progress:
        yield
    else:
        with contextlib.redirect_stderr(io.StringIO()):
            yield


def case_overrides(planted: PlantedConfig, cfg: GroundTruthConfig, root: Path) -> dict:
    """The packaged ``groundtruth`` pipeline config's per-case options: the planted store, and the SAE and
    crosscoder sizes this benchmark's options give for that pair."""
    n_a = planted.n_shared + planted.n_a_only
    n_joint = n_a + planted.n_b_only
    k = max(1, round(planted.k))
    return {"work": str(root / "pipeline"), "out": str(root / "report"), "threads": cfg.threads, "seed": cfg.seed,
            "data.store": str(root / "store"),
            "saes.train.d_sae": round(cfg.sae_width * n_a), "saes.train.k": k, "saes.train.lr": cfg.sae_lr,
            "saes.train.tokens": cfg.sae_steps * cfg.sae_batch, "saes.train.batch_size": cfg.sae_batch,
            "saes.train.warmup_steps": cfg.sae_steps // 20, "saes.train.dead_feature_window": max(1, cfg.sae_steps // 5),
            "saes.train.seed": cfg.seed, "saes.train.seed_b": cfg.seed + 1,  # the control's SAEs differ by seed
            "crosscoder.dict_size": round(cfg.cc_width * n_joint),
            "crosscoder.k": max(1, round(planted.k * n_joint / n_a)),
            "crosscoder.tokens": cfg.cc_steps * cfg.cc_batch, "crosscoder.batch_size": cfg.cc_batch,
            "crosscoder.lr": cfg.cc_lr}


def run_case(name: str, planted: PlantedConfig, cfg: GroundTruthConfig, work: Path,
             log: Callable[[str], None] = lambda _: None, progress: bool = False) -> CaseResult:
    """Generate one planted pair in ``work/name`` (recreated), run the packaged ``groundtruth`` pipeline
    config on it (SAEs, map, align, crosscoder, compare), and score the artifacts against the answer key."""
    import numpy as np

    from baselines.crosscoder.analysis import load_latents
    from baselines.crosscoder.model import load

    from ..compare import ANALYSIS_DIR, load_comparison
    from ..diff import load_table
    from ..linear_map import LinearMap
    from ..pipeline.config import load_config, packaged
    from ..pipeline.runner import run_pipeline
    from ..saes import load_sae

    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t = time.perf_counter()
    pair = make_planted(planted)
    write_planted_store(pair, root / "store")
    generate = time.perf_counter() - t
    pcfg = load_config(packaged("groundtruth"), case_overrides(planted, cfg, root))
    with _quiet(progress), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = run_pipeline(pcfg, log=lambda _: None, progress=progress, command=command_line(cfg))
    w = Path(pcfg.work)
    cost = load_comparison(w / "compare-diff").summary["cost"]["total"]  # fit + align; train + analyze
    seconds = {"generate": generate, "saes": r["saes"]["seconds"], "align": cost["align"]["seconds"],
               "crosscoder": cost["crosscoder"]["seconds"], "pipeline": sum(v["seconds"] for v in r.values())}
    fvu = {s: 1.0 - r["saes"][s]["fve"] for s in ("a", "b")}
    cc_fve = {s: float(r["crosscoder"]["diff"].get(f"fve_{s}") or np.nan) for s in ("a", "b")}
    log(f"  [{name}] SAEs trained in {seconds['saes']:.0f} s (held-out FVU A {fvu['a']:.3f}, B {fvu['b']:.3f}); "
        f"crosscoder {seconds['crosscoder']:.0f} s (held-out FVE A {cc_fve['a']:.3f}, B {cc_fve['b']:.3f}); "
        f"align {seconds['align']:.1f} s")
    cc = load(str(w / "crosscoder-diff"))
    dec_cc = tuple(b.detach().numpy() for b in cc.split(cc.W_dec_LD.detach()))
    dec_sae = tuple(load_sae(str(w / f"sae-{s}")).W_dec.detach().numpy() for s in ("a", "b"))
    scores = score_case(pair, load_table(w / "align-diff"), dec_sae, load_latents(w / "compare-diff" / ANALYSIS_DIR),
                        dec_cc, cfg.recover_threshold)
    return CaseResult(name=name, planted=planted, scores=scores, seconds=seconds, sae_fvu=fvu, cc_fve=cc_fve,
                      map_fve=float(LinearMap.load(r["map"]["maps"]["diff"]).scores_["a_to_b"]["heldout_fve"]))


def sweep_points(cfg: GroundTruthConfig) -> list[tuple[str, float]]:
    return [(axis, float(v)) for axis in AXES for v in getattr(cfg, f"sweep_{axis}")]


def run_groundtruth(cfg: GroundTruthConfig, out: str | Path, work: str | Path, log: Callable[[str], None] = print,
                    progress: bool = False) -> GroundTruthResult:
    """Main case, seed-pair control, sweep; ``config.json`` is written to ``out`` before the first case."""
    from ..io import atomic_write_json

    out, work = Path(out), Path(work)
    if out.exists() and not out.is_dir():
        raise DiffkitError(f"--out {out} is a file: pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"command": command_line(cfg), **json.loads(json.dumps(asdict(cfg)))})
    t0 = time.perf_counter()
    points = sweep_points(cfg)
    total = 2 + len(points)
    log(f"[1/{total}] main case: {_describe(cfg.planted())}")
    main = run_case("main", cfg.planted(), cfg, work, log, progress)
    control_cfg = cfg.planted(frac_exclusive=0.0, frac_changed=0.0)
    log(f"[2/{total}] seed-pair control (no exclusive or changed features, SAE seeds {cfg.seed} vs {cfg.seed + 1}): "
        f"{_describe(control_cfg)}")
    control = run_case("control", control_cfg, cfg, work, log, progress)
    sweep: dict[str, list[tuple[float, CaseResult]]] = {axis: [] for axis in AXES}
    for i, (axis, value) in enumerate(points):
        if value == getattr(cfg, axis):  # the main case is this point: not trained twice
            log(f"[{3 + i}/{total}] sweep {axis} = {value:g}: the main case")
            sweep[axis].append((value, main))
            continue
        log(f"[{3 + i}/{total}] sweep {axis} = {value:g}")
        case = run_case(f"sweep_{axis}_{value:g}", cfg.planted(**{axis: value}), cfg, work, log, progress)
        sweep[axis].append((value, case))
    return GroundTruthResult(config=cfg, main=main, control=control, sweep=sweep, seconds=time.perf_counter() - t0)


def _describe(p: PlantedConfig) -> str:
    sa, sb = p.superposition
    return (f"d {p.d_a}, {p.n_shared} shared ({p.n_changed} changed ×{p.change_factor:g}), {p.n_a_only} A-only, "
            f"{p.n_b_only} B-only, {sa:.1f} features/dim, noise {p.noise:g}, {p.n_tokens:,} tokens")


def command_line(cfg: GroundTruthConfig) -> str:
    return COMMAND + (" --quick" if cfg.quick else "")

