"""``diffkit bench groundtruth``: both methods on planted pairs, scored against the known answer.

One *case* (:func:`run_case`) is the whole product on a planted pair (:mod:`diffkit.synthetic`):

1. draw the pair and write it as a real :class:`~diffkit.activations.ActivationStore`;
2. train a TopK SAE on each side with :func:`diffkit.sae_train.train_sae` (sae-lens's own trainer,
   raw activations of the store's train split, ``metadata.hook_name`` set), saved in sae-lens's format;
3. the training-free diff: ``LinearMap().fit(store)`` + :func:`diffkit.diff.align` at its defaults;
4. the crosscoder baseline: :func:`baselines.crosscoder.train.train` (BatchTopK) on the same store,
   then :func:`baselines.crosscoder.analysis.analyze` for its relative norms and labels;
5. score both against the answer key (:mod:`.groundtruth_score`).

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
from ..synthetic import PLANTED_HOOK, PlantedConfig, make_planted, planted_config, write_planted_store
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


def train_sae(store, side: str, d_sae: int, k: int, cfg: GroundTruthConfig, seed: int, out: Path) -> tuple[Path, float]:
    """A TopK SAE on ``side``'s raw train activations: :func:`diffkit.sae_train.train_sae` (the one SAE
    trainer, sae-lens's own) fed batches drawn with replacement by a seeded sampler, saved in sae-lens format.

    Returns the directory and the SAE's held-out FVU (``Σ‖x − x̂‖² / Σ‖x − x̄‖²``).
    """
    import torch

    from ..sae_train import SAETrainConfig, train_sae as train

    def split(name: str) -> torch.Tensor:
        return torch.cat([ab[0 if side == "a" else 1] for ab in store.iter_shards(name, normalized=False)]).float()

    acts, held = split("train"), split("heldout")
    gen = torch.Generator().manual_seed(seed)
    batches = (acts[torch.randint(0, len(acts), (cfg.sae_batch,), generator=gen)] for _ in iter(int, 1))
    steps = cfg.sae_steps
    train_cfg = SAETrainConfig(arch="topk", d_sae=d_sae, k=k, tokens=steps * cfg.sae_batch, batch_size=cfg.sae_batch,
                               lr=cfg.sae_lr, warmup_steps=steps // 20, decay_fraction=0.2,
                               dead_feature_window=max(1, steps // 5), seed=seed, normalize=False,
                               checkpoint_every=steps)  # seconds to train: no checkpoints
    rec = train(batches, int(acts.shape[1]), train_cfg, out, PLANTED_HOOK, heldout=lambda: [held],
                metadata={"model_name": f"planted:{side}"},
                inputs={"store": str(store.root), "source": side, "sampler": "uniform with replacement"},
                overwrite=True, progress=False)
    return out, 1.0 - rec["fve"]


def run_case(name: str, planted: PlantedConfig, cfg: GroundTruthConfig, work: Path,
             log: Callable[[str], None] = lambda _: None, progress: bool = False) -> CaseResult:
    """Generate, train, diff and score one planted pair in ``work/name`` (recreated)."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_case(name, planted, cfg, work, log, progress)
    finally:
        torch.set_num_threads(threads_before)


def _run_case(name: str, planted: PlantedConfig, cfg: GroundTruthConfig, work: Path, log: Callable[[str], None],
              progress: bool) -> CaseResult:
    from baselines.crosscoder.analysis import AnalyzeConfig, analyze, load_latents
    from baselines.crosscoder.model import load
    from baselines.crosscoder.train import TrainConfig, train

    from ..activations import ActivationStore
    from ..diff import AlignConfig, align
    from ..linear_map import LinearMap
    from ..saes import load_sae

    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    pair = make_planted(planted)
    write_planted_store(pair, root / "store")
    store = ActivationStore.open(root / "store")
    seconds["generate"] = time.perf_counter() - t
    k = max(1, round(planted.k))
    sae_seed = {"a": cfg.seed, "b": cfg.seed + 1}  # different seeds: the control's SAEs differ by seed alone
    fvu = {}
    t = time.perf_counter()
    with _quiet(progress):
        for side, dictionary in (("a", pair.dict_a), ("b", pair.dict_b)):
            _, fvu[side] = train_sae(store, side, round(cfg.sae_width * len(dictionary)), k, cfg, sae_seed[side],
                                     root / f"sae_{side}")
    seconds["saes"] = time.perf_counter() - t
    log(f"  [{name}] SAEs trained in {seconds['saes']:.0f} s (held-out FVU A {fvu['a']:.3f}, B {fvu['b']:.3f})")

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lmap = LinearMap().fit(store)
        saes = load_sae(str(root / "sae_a")), load_sae(str(root / "sae_b"))
        diff = align(store, *saes, lmap, AlignConfig(n_contexts=0))
    seconds["align"] = time.perf_counter() - t

    t = time.perf_counter()
    n_joint = planted.n_shared + planted.n_a_only + planted.n_b_only
    k_cc = max(1, round(planted.k * n_joint / (planted.n_shared + planted.n_a_only)))
    tcfg = TrainConfig(acts=str(root / "store"), out=str(root / "crosscoder"), dict_size=round(cfg.cc_width * n_joint),
                       k=k_cc, lr=cfg.cc_lr, batch_size=cfg.cc_batch, tokens=cfg.cc_steps * cfg.cc_batch,
                       seed=cfg.seed, checkpoint_every=0, log_every=max(1, cfg.cc_steps), eval_tokens=10_000)
    with _quiet(progress):
        summary = train(tcfg, progress=progress, threads=cfg.threads, log=lambda _: None)
        analyze(AnalyzeConfig(crosscoder=str(root / "crosscoder"), acts=str(root / "store"), out=str(root / "analysis"),
                              split="all", n_contexts=0, top_n=0), progress=False)
    seconds["crosscoder"] = time.perf_counter() - t
    latents = load_latents(root / "analysis")
    cc = load(str(root / "crosscoder"))
    dec_a, dec_b = (w.detach().numpy() for w in cc.split(cc.W_dec_LD.detach()))
    cc_fve = {s: float(summary["heldout"].get(f"fve_{s}", float("nan"))) for s in ("a", "b")}
    log(f"  [{name}] crosscoder trained in {seconds['crosscoder']:.0f} s (held-out FVE A {cc_fve['a']:.3f}, "
        f"B {cc_fve['b']:.3f}); align {seconds['align']:.1f} s")
    scores = score_case(pair, diff, tuple(s.W_dec.numpy() for s in saes), latents, (dec_a, dec_b),
                        cfg.recover_threshold)
    return CaseResult(name=name, planted=planted, scores=scores, seconds=seconds, sae_fvu=fvu, cc_fve=cc_fve,
                      map_fve=float(lmap.scores_["a_to_b"]["heldout_fve"]))


def sweep_points(cfg: GroundTruthConfig) -> list[tuple[str, float]]:
    return [(axis, float(v)) for axis in AXES for v in getattr(cfg, f"sweep_{axis}")]


def run_groundtruth(cfg: GroundTruthConfig, out: str | Path, work: str | Path, log: Callable[[str], None] = print,
                    progress: bool = False) -> GroundTruthResult:
    """Main case, seed-pair control, sweep; ``config.json`` is written to ``out`` before the first case."""
    from ..store_format import atomic_write_json

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

