"""Experiment 3, ``architecture``: same data and objective, different networks."""

from __future__ import annotations

from .common import Condition
from .nets import NetSpec
from .runner import mean_r2, run_standard

TITLE = "different architectures"
HYPOTHESIS = ("With the same data and objective, latents stay linearly mappable across architectures (R² ≥ 0.8), "
              "a little below the seed pair, and MLP vs CNN differs most.")
LABELS = ("seeds (same MLP)", "hidden width 128 vs 512", "1 vs 2 hidden layers", "MLP vs CNN")


def conditions() -> list[Condition]:
    a = NetSpec()
    return [Condition(LABELS[0], 0, a, a), Condition(LABELS[1], 1, a, NetSpec(hidden=512)),
            Condition(LABELS[2], 2, a, NetSpec(depth=2)), Condition(LABELS[3], 3, a, NetSpec(arch="cnn"))]


def judge(s: dict) -> tuple[str, str, dict]:
    r = {k: mean_r2(s[k]) for k in LABELS}
    worst = min(LABELS[1:], key=r.get)
    mappable = min(r[k] for k in LABELS[1:]) >= 0.8
    below = all(r[k] <= r[LABELS[0]] + 0.005 for k in LABELS[1:])
    held = "held" if mappable and below and worst == LABELS[3] else "partly" if mappable else "did not hold"
    verdict = ("Linear R² (mean of both directions): " + ", ".join(f"{k} {v:.3f}" for k, v in r.items())
               + f"; the largest drop is {worst}. MLP−linear gap: "
               + ", ".join(f"{k} {(s[k]['gap_ab'] + s[k]['gap_ba']) / 2:+.3f}" for k in LABELS) + ".")
    return held, verdict, {k: v for k, v in r.items()}


def run(cfg, out, cache, log):
    intro = ["All networks are digit classifiers with a 32-unit ReLU latent, trained on the same data; "
             "A is always the 1-hidden-layer MLP (64→128→32), B changes its hidden width, its depth, or is a "
             "small CNN (two 3×3 convolutions)."]
    return run_standard(cfg, out, cache, log, conditions(), TITLE, intro, HYPOTHESIS, judge)
