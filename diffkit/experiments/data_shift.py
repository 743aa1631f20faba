"""Experiment 2, ``data``: same architecture, different training data, stepwise.

2A digits 0–9 vs 0–8; 2B 0–4 vs 5–9; 2C digits vs a strongly transformed digits set (transposed
and inverted) and vs another dataset (mnist1d resampled to 64 inputs); then the partial-overlap
curve: A on 0–4, B on a set of the same size with a fraction P drawn from 5–9.
"""

from __future__ import annotations

from .common import Condition
from .nets import NetSpec
from .report import fig_curve, summary_table
from .runner import mean_r2, run_standard

TITLE = "different training data (2A / 2B / 2C and partial overlap)"
HYPOTHESIS = ("Mappability falls stepwise as the training data diverge: seeds ≥ 2A ≥ 2B ≥ 2C (linear R²), and "
              "along the partial-overlap curve it falls monotonically as B's share of digits 5–9 grows.")
MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)
STEPS = ("seeds (same data)", "2A: 0–9 vs 0–8", "2B: 0–4 vs 5–9", "2C: digits vs transposed+inverted",
         "2C: digits vs mnist1d")


def mix_label(p: float) -> str:
    return f"mix: 0–4 vs {p:.0%} of 5–9"


def conditions() -> list[Condition]:
    d = NetSpec()
    lo = NetSpec(data="digits0-4")
    steps = [Condition(STEPS[0], 0, d, d), Condition(STEPS[1], 1, d, NetSpec(data="digits0-8")),
             Condition(STEPS[2], 2, lo, NetSpec(data="digits5-9")), Condition(STEPS[3], 3, d, NetSpec(data="digits-T")),
             Condition(STEPS[4], 4, d, NetSpec(data="mnist1d"))]
    return steps + [Condition(mix_label(p), p, lo, NetSpec(data=f"mix:{p:g}")) for p in MIXES]


def judge(s: dict) -> tuple[str, str, dict]:
    r = [mean_r2(s[k]) for k in STEPS]
    mix = [mean_r2(s[mix_label(p)]) for p in MIXES]
    sd = max(max(s[mix_label(p)]["lin_r2_ab_sd"], s[mix_label(p)]["lin_r2_ba_sd"]) for p in MIXES)
    stepwise = r[0] >= r[1] >= r[2] >= max(r[3], r[4])
    inversions = sum(b > a + sd for a, b in zip(mix, mix[1:]))
    held = "held" if stepwise and inversions == 0 else "partly" if stepwise or inversions == 0 else "did not hold"
    verdict = ("Linear R² (mean of both directions): " + ", ".join(f"{k.split(':')[0]} {v:.3f}" for k, v in
                                                                     zip(("seeds", "2A", "2B", "2C-T", "2C-mnist1d"), r))
               + "; partial overlap P = 0 → 1: " + " → ".join(f"{v:.3f}" for v in mix)
               + f" ({inversions} rise(s) larger than the largest sd {sd:.3f}).")
    return held, verdict, {"seeds": r[0], "2A": r[1], "2B": r[2], "2C-T": r[3], "2C-mnist1d": r[4],
                           "mix P=0": mix[0], "mix P=1": mix[-1]}


def extra(result, out, command):
    from .common import summarize
    from .report import SUMMARY_COLS

    summary = [s for s in summarize(result.rows, SUMMARY_COLS) if s["condition"].startswith("mix")]
    fig_curve(summary, out / "figures" / "mix_curve.png", command,
              "partial overlap: A on 0–4, B with a fraction P of 5–9", "fraction P of B's data from digits 5–9")
    return ["## Partial overlap", "", *summary_table(summary), "",
            f"![partial overlap curve](figures/mix_curve.png)\n\n*Figure: held-out R² against the fraction of B's "
            f"training data drawn from digits 5–9 (A: 0–4 only), mean ± sd (`{command}`).*", "",
            "Every model is scored on the same held-out digits 0–9, including the digits a model never saw in "
            "training; the mnist1d model has never seen a digit image at all."]


def run(cfg, out, cache, log):
    intro = ["Same MLP (64→128→32) and recipe, trained on different data; all latents are taken on the same "
             "held-out digit images. The stepwise path of the plan: 2A (one class removed), 2B (disjoint classes), "
             "2C (a transformed set; another dataset), then the partial-overlap curve between 0–4 and 5–9."]
    return run_standard(cfg, out, cache, log, conditions(), TITLE, intro, HYPOTHESIS, judge, extra)
