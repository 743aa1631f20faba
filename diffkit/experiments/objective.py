"""Experiment 4, ``objective``: same data and backbone, different training objectives."""

from __future__ import annotations

from .common import Condition
from .nets import NetSpec
from .runner import mean_r2, run_standard

TITLE = "different objectives (classifier, autoencoder, contrastive)"
HYPOTHESIS = ("A change of objective moves the latent space more than a change of seed: classifier vs "
              "autoencoder maps worst, and there the nonlinear map gains most over the linear one.")
LABELS = ("seeds (both classify)", "classify vs contrastive", "classify vs autoencode", "autoencode vs contrastive")


def conditions() -> list[Condition]:
    c, ae, cl = NetSpec(), NetSpec(objective="autoencode"), NetSpec(objective="contrastive")
    return [Condition(LABELS[0], 0, c, c), Condition(LABELS[1], 1, c, cl), Condition(LABELS[2], 2, c, ae),
            Condition(LABELS[3], 2, ae, cl)]


def judge(s: dict) -> tuple[str, str, dict]:
    r = {k: mean_r2(s[k]) for k in LABELS}
    gap = {k: (s[k]["gap_ab"] + s[k]["gap_ba"]) / 2 for k in LABELS}
    worst = min(LABELS[1:], key=r.get)
    biggest_gap = max(LABELS, key=gap.get)
    drop = all(r[k] < r[LABELS[0]] for k in LABELS[1:])
    held = ("held" if drop and worst == LABELS[2] and biggest_gap == LABELS[2] else
            "partly" if drop else "did not hold")
    verdict = ("Linear R² (mean of both directions): " + ", ".join(f"{k} {v:.3f}" for k, v in r.items())
               + f"; worst: {worst}. MLP−linear gap: " + ", ".join(f"{k} {v:+.3f}" for k, v in gap.items())
               + f"; largest gap: {biggest_gap}.")
    return held, verdict, {**r, "largest MLP gap": gap[biggest_gap]}


def run(cfg, out, cache, log):
    intro = ["The same MLP encoder (64→128→32, ReLU latent) trained on all digits with three heads: a linear "
             "classifier (cross-entropy), a decoder back to the 64 pixels (MSE), or a projection head trained "
             "with a SimCLR-style InfoNCE loss between two noisy views (no labels)."]
    return run_standard(cfg, out, cache, log, conditions(), TITLE, intro, HYPOTHESIS, judge)
