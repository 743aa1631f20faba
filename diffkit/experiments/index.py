"""``OUT/index.md``: one table over every experiment, each hypothesis with its verdict, and a discussion.

The verdicts are computed from the numbers by each experiment's ``judge`` (criteria in the
hypothesis text), so a rerun rewrites them consistently with its own numbers.
"""

from __future__ import annotations

import platform
from pathlib import Path

from .report import fmt


def write_index(outcomes: list, out: Path, quick: bool, seconds: float) -> Path:
    command = f"diffkit experiment all --out {out}" + (" --quick" if quick else "")
    lines = [
        f"<!-- Regenerate with: {command} -->",
        "# The toy experiment series: how far do two networks' latent spaces stay mappable?",
        "",
        f"`{command}` ran {len(outcomes)} experiments in {seconds / 60:.1f} min on {platform.machine()} "
        "(torch on 1 thread, 2 shared cores). Each line below links to a report with its conditions, tables "
        "(CSV), figures (error-vs-difference curve, correlation heatmaps, PCA of aligned latents) and options "
        "(`config.json`).",
        "",
        "## Hypotheses and verdicts",
        "",
        "| experiment | hypothesis | verdict | time |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(f"| [{o.name}]({o.name}/report.md) | {o.hypothesis} | **{o.held}** | {o.seconds:.0f} s |")
    lines += ["", "## Headline numbers", ""]
    for o in outcomes:
        lines.append(f"- **{o.name}** ({o.title}): " + "; ".join(f"{k} {fmt(val)}" for k, val in o.headline.items()))
    lines += ["", "## What the numbers say", ""]
    for o in outcomes:
        lines.append(f"- **{o.name}: {o.held}.** {o.verdict}")
    floor = next((o for o in outcomes if o.name == "seeds"), None)
    if floor is not None:
        f = next(s for s in floor.summary if s["condition"].startswith("untrained"))
        f_r2 = (f["lin_r2_ab"] + f["lin_r2_ba"]) / 2
        below = [f"{o.name}: {s['condition']} ({(s['lin_r2_ab'] + s['lin_r2_ba']) / 2:.3f})" for o in outcomes
                 for s in o.summary if (s["lin_r2_ab"] + s["lin_r2_ba"]) / 2 < f_r2 and s is not f]
        lines += ["", f"Against the floor: a trained network maps onto an *untrained* one with linear R² {f_r2:.3f}. "
                  + (f"{len(below)} trained pair(s) fall below it — " + "; ".join(below) + ". There the two models "
                     "share less linearly decodable structure than a random ReLU feature map keeps of its input."
                     if below else "No trained pair falls below it.")]
    lines += ["", "## Reading guide", "",
              "- R² is the held-out FVE of a map fitted on the latents of other inputs (`diffkit.metrics`); 1 − R² "
              "is the error plotted against the size of the difference. The untrained-network floor in `seeds` "
              "shows how much R² a random ReLU feature map already gets: compare differences to it, not to 0.",
              "- `1-to-1 / lin` compares the best unit-to-unit map (Hungarian on |corr|) with the full linear map: "
              "the planted permuted copy gives 1.0; trained seed pairs give much less, so matching units one-to-one "
              "(as the training-free diff does for SAE features, not for raw units) would miss most of the shared "
              "space.",
              "- mean CCA averages all canonical directions and is dragged down by dims with little variance; "
              "SVCCA (99% variance) and CKA weight the directions that carry the signal.",
              ""]
    path = Path(out) / "index.md"
    path.write_text("\n".join(lines))
    return path
