"""The shared loop of the toy experiments: conditions × repetitions -> trained pairs -> measures.

An experiment is a list of :class:`Condition` (two network specs and the size of their difference)
run for each repetition ``r`` of :attr:`ExperimentConfig.reps`: model A from seed ``100 + r``,
model B from seed ``200 + r`` (a ``permuted`` condition's B is A with its latent units permuted).
Trained networks are cached by (spec, seed) for the whole run, so a model shared by several
experiments is trained once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DiffkitError
from .data import digits
from .measures import compare
from .nets import NetSpec, accuracy, latents, permuted_copy, train

SEED_A, SEED_B = 100, 200


@dataclass(frozen=True)
class ExperimentConfig:
    """Options of one experiment run (saved as ``config.json`` beside its report)."""

    name: str
    reps: int = 3
    epochs: int = 30
    mlp_steps: int = 400
    quick: bool = False
    threads: int = 1
    zoo_tokens: int = 24_000

    def __post_init__(self) -> None:
        if self.reps < 1 or self.epochs < 1 or self.mlp_steps < 1 or self.threads < 1 or self.zoo_tokens < 2000:
            raise DiffkitError(f"experiment options must be positive (zoo_tokens >= 2000): {self}")

    @classmethod
    def make(cls, name: str, quick: bool, threads: int = 1) -> "ExperimentConfig":
        if quick:
            return cls(name, reps=1, epochs=6, mlp_steps=80, quick=True, threads=threads, zoo_tokens=4000)
        return cls(name, threads=threads)

    def command(self, out: str | Path) -> str:
        return f"diffkit experiment {self.name} --out {out}" + (" --quick" if self.quick else "")


@dataclass(frozen=True)
class Condition:
    """One pair of networks; ``level`` orders the conditions by the size of their difference."""

    label: str
    level: float
    a: NetSpec
    b: NetSpec
    permuted: bool = False  # B = A with its latent units permuted (planted; ``b`` is ignored)
    layer: int = -1         # which layer to compare (-1: the latent; 0..depth-1: hidden layers)
    train_set: str = ""     # map-fit inputs: "" = the digits' train split; or a digit range "0-4"
    eval_set: str = ""      # scored inputs: "" = the held-out split; or a digit range "5-9"


@dataclass
class ExperimentResult:
    cfg: ExperimentConfig
    conditions: list[Condition]
    rows: list[dict]                              # one per (condition, repetition)
    examples: dict = field(default_factory=dict)  # label -> (PairResult, za_te, zb_te, labels) of repetition 0
    extra: dict = field(default_factory=dict)     # experiment-specific results
    seconds: float = 0.0


class ModelCache:
    """Trained networks by (spec, seed), shared across the experiments of one run."""

    def __init__(self) -> None:
        self._nets: dict = {}

    def get(self, spec: NetSpec, seed: int) -> Any:
        key = (spec, seed)
        if key not in self._nets:
            self._nets[key] = train(spec, seed)
        return self._nets[key]


def _inputs(which: str, default: Any) -> tuple[np.ndarray, np.ndarray]:
    if not which:
        return default.x, default.y
    lo, hi = (int(v) for v in which.split("-"))
    train, held = digits()
    src = held if default is held else train
    keep = (src.y >= lo) & (src.y <= hi)
    return src.x[keep], src.y[keep]


def run_pair(cond: Condition, cfg: ExperimentConfig, rep: int, cache: ModelCache) -> tuple[dict, tuple]:
    """Train (or fetch) both networks of ``cond`` for repetition ``rep`` and measure them."""
    tr, he = digits()
    a_spec = replace(cond.a, epochs=cfg.epochs)
    b_spec = replace(cond.b, epochs=cfg.epochs)
    net_a = cache.get(a_spec, SEED_A + rep)
    if cond.permuted:
        perm = np.random.default_rng(rep).permutation(a_spec.latent)
        net_b, b_spec = permuted_copy(net_a, a_spec, perm), a_spec
    else:
        net_b = cache.get(b_spec, SEED_B + rep)
    x_tr, _ = _inputs(cond.train_set, tr)
    x_te, y_te = _inputs(cond.eval_set, he)
    za, zb = latents(net_a, x_tr, cond.layer), latents(net_b, x_tr, cond.layer)
    za_te, zb_te = latents(net_a, x_te, cond.layer), latents(net_b, x_te, cond.layer)
    res = compare(za, zb, za_te, zb_te, seed=rep, mlp_steps=cfg.mlp_steps)
    row = {"condition": cond.label, "level": cond.level, "rep": rep, "seed_a": SEED_A + rep,
           "seed_b": SEED_A + rep if cond.permuted else SEED_B + rep, "model_a": a_spec.label(),
           "model_b": b_spec.label() + (" (permuted copy of A)" if cond.permuted else ""),
           "acc_a": accuracy(net_a, a_spec, he.x, he.y), "acc_b": accuracy(net_b, b_spec, he.x, he.y),
           **res.scores}
    return row, (res, za_te, zb_te, y_te)


def run_conditions(cfg: ExperimentConfig, conditions: list[Condition], cache: ModelCache,
                   log: Callable[[str], None]) -> ExperimentResult:
    """Every condition × repetition; ``log`` gets one line per condition."""
    t0 = time.perf_counter()
    rows, examples = [], {}
    for cond in conditions:
        t = time.perf_counter()
        for rep in range(cfg.reps):
            row, example = run_pair(cond, cfg, rep, cache)
            rows.append(row)
            if rep == 0:
                examples[cond.label] = example
        mean = np.mean([r["lin_r2_ab"] for r in rows if r["condition"] == cond.label])
        log(f"    {cond.label}: linear R² A→B {mean:.3f} ({time.perf_counter() - t:.1f} s)")
    return ExperimentResult(cfg, conditions, rows, examples, seconds=time.perf_counter() - t0)


def summarize(rows: list[dict], cols: tuple[str, ...]) -> list[dict]:
    """Mean and standard deviation (ddof 0, over repetitions) of ``cols`` per condition, in order."""
    out = []
    for label in dict.fromkeys(r["condition"] for r in rows):
        sel = [r for r in rows if r["condition"] == label]
        entry: dict[str, Any] = {"condition": label, "level": sel[0]["level"], "n": len(sel)}
        for c in cols:
            v = np.array([r[c] for r in sel], dtype=np.float64)
            v = v[np.isfinite(v)]
            entry[c], entry[c + "_sd"] = (float(v.mean()), float(v.std())) if len(v) else (float("nan"), 0.0)
        out.append(entry)
    return out


def save_config(cfg: ExperimentConfig, conditions: list[Condition], out: Path) -> None:
    """``config.json``: the frozen options and every condition's specs, written before any result."""
    from ..io import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"kind": "diffkit.Experiment", "config": asdict(cfg),
                                            "conditions": [asdict(c) for c in conditions]})


def load_config(out: Path) -> dict:
    return json.loads((Path(out) / "config.json").read_text())
