"""Experiment 5, ``width``: latent dimension 16 vs 32 and 8 vs 64 — which units are used, which stay empty."""

from __future__ import annotations

import numpy as np

from .common import Condition
from .nets import NetSpec
from .report import _finish, _plt, fmt
from .runner import run_standard

TITLE = "latent width (32 vs 32, 16 vs 32, 8 vs 64)"
HYPOTHESIS = ("The narrow latent lives inside the wide one: wide→narrow maps well (R² ≥ 0.9) while narrow→wide "
              "leaves part of the wide space unexplained; the mappable subspace (eff. dim) is bounded by the narrow "
              "width, and some of the wide model's units stay empty (dead or unpredictable).")
LABELS = ("seeds: z32 vs z32", "z16 vs z32", "z8 vs z64")
WIDTHS = ((32, 32), (16, 32), (8, 64))


def conditions() -> list[Condition]:
    return [Condition(label, i, NetSpec(latent=a), NetSpec(latent=b)) for i, (label, (a, b)) in
            enumerate(zip(LABELS, WIDTHS))]


def judge(s: dict) -> tuple[str, str, dict]:
    parts, ok_wide, ok_narrow, ok_dim = [], True, True, True
    for label, (wa, wb) in zip(LABELS[1:], WIDTHS[1:]):
        x = s[label]
        ok_wide &= x["lin_r2_ba"] >= 0.9
        ok_narrow &= x["lin_r2_ab"] < x["lin_r2_ba"]
        ok_dim &= x["eff_dim"] <= wa
        parts.append(f"{label}: wide→narrow R² {x['lin_r2_ba']:.3f}, narrow→wide {x['lin_r2_ab']:.3f}, eff. dim "
                     f"{x['eff_dim']:.1f} (narrow width {wa}), wide units alive {x['alive_b']:.1f}/{wb} of which "
                     f"{x['fit_units_ab']:.1f} predicted at FVE ≥ 0.5")
    held = "held" if ok_wide and ok_narrow and ok_dim else "partly" if ok_dim else "did not hold"
    z8 = s[LABELS[2]]
    return held, "; ".join(parts) + ".", {"z8→z64 R²": z8["lin_r2_ab"], "z64→z8 R²": z8["lin_r2_ba"],
                                          "z64 units alive": z8["alive_b"], "z64 units predicted": z8["fit_units_ab"]}


def extra(result, out, command):
    plt = _plt()
    labels = LABELS[1:]
    fig, axes = plt.subplots(1, len(labels), figsize=(5.0 * len(labels), 3.3), squeeze=False)
    rows = ["## Which units of the wide model are used (repetition 0)", "",
            "| pair | wide units | dead (no held-out variance) | live, predicted (FVE ≥ 0.5) | live, not predicted |"
            " participation ratio narrow / wide |", "|---|---|---|---|---|---|"]
    for ax, label in zip(axes[0], labels):
        res, _, zb_te, _ = result.examples[label]
        per = res.fve_per_dim_ab
        dead = zb_te.std(0) <= 1e-8
        order = np.argsort(np.where(dead, -np.inf, np.nan_to_num(per, nan=-np.inf)))[::-1]
        vals = np.where(dead, 0.0, np.clip(np.nan_to_num(per, nan=0.0), -0.2, 1.0))[order]
        ax.bar(np.arange(len(vals)), vals, color=["0.7" if d else "C0" for d in dead[order]])
        ax.axhline(0.5, color="C3", lw=0.8, ls="--")
        ax.set_title(f"{label}: held-out FVE of each wide unit (grey: dead)", fontsize=8)
        ax.set_xlabel("wide unit (sorted)", fontsize=7)
        ax.set_ylim(-0.2, 1.02)
        live = ~dead
        pred = live & (np.nan_to_num(per, nan=-1) >= 0.5)
        rows.append(f"| {label} | {len(per)} | {int(dead.sum())} | {int(pred.sum())} | {int((live & ~pred).sum())} | "
                    f"{fmt(res.scores['pr_a'], digits=1)} / {fmt(res.scores['pr_b'], digits=1)} |")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _finish(fig, out / "figures" / "wide_units.png", command)
    return rows + ["", f"![wide units](figures/wide_units.png)\n\n*Figure: held-out FVE of each unit of the wide "
                   f"latent under the linear map from the narrow one, sorted; grey bars are dead units "
                   f"(`{command}`).*"]


def run(cfg, out, cache, log):
    intro = ["Digit classifiers (MLP 64→128→z, ReLU latent) that differ only in the latent width z; A is the "
             "narrow one, so A→B is narrow→wide."]
    return run_standard(cfg, out, cache, log, conditions(), TITLE, intro, HYPOTHESIS, judge, extra)
