"""Markdown report, figures (matplotlib Agg) and CSV tables of one toy experiment.

Layout under ``OUT/NAME/``: ``report.md``, ``config.json``, ``figures/*.png``, ``tables/*.csv``.
Every report starts with an HTML comment naming the command that regenerates it; every figure
carries that command in its footer and every CSV in a first ``#`` line (read with
``pandas.read_csv(path, comment="#")``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from .common import ExperimentResult, summarize

SUMMARY_COLS = ("lin_r2_ab", "lin_r2_ba", "mlp_r2_ab", "mlp_r2_ba", "gap_ab", "gap_ba", "perm_r2_ab", "perm_r2_ba",
                "one_to_one", "match_corr", "cca", "svcca", "cka", "eff_dim", "alive_a", "alive_b", "lin_mse_ab",
                "lin_mse_ba", "acc_a", "acc_b", "fit_units_ab", "fit_units_ba", "pr_a", "pr_b")
HEADLINE = (("lin_r2_ab", "lin R² A→B"), ("lin_r2_ba", "lin R² B→A"), ("mlp_r2_ab", "MLP R² A→B"),
            ("mlp_r2_ba", "MLP R² B→A"), ("perm_r2_ab", "1-to-1 R² A→B"), ("one_to_one", "1-to-1 / lin"),
            ("svcca", "SVCCA"), ("cca", "mean CCA"), ("cka", "CKA"), ("eff_dim", "eff. dim"))


def write_csv(path: Path, rows: list[dict], command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        f.write(f"# regenerate: {command}\n")
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, path: Path, command: str) -> None:
    fig.text(0.005, 0.005, f"regenerate: {command}", fontsize=6, color="0.4")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    _plt().close(fig)


def fig_curve(summary: list[dict], path: Path, command: str, title: str, xlabel: str = "condition") -> None:
    """Error-vs-difference curve: held-out R² of the maps (mean ± sd over repetitions) per condition."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(summary) + 2), 4.2))
    x = np.arange(len(summary))
    for col, style, name in (("lin_r2_ab", "o-", "linear A→B"), ("lin_r2_ba", "o--", "linear B→A"),
                             ("mlp_r2_ab", "s-", "MLP A→B"), ("mlp_r2_ba", "s--", "MLP B→A"),
                             ("perm_r2_ab", "^:", "one-to-one A→B"), ("cka", "d-.", "linear CKA")):
        ax.errorbar(x, [s[col] for s in summary], yerr=[s[col + "_sd"] for s in summary], fmt=style, capsize=3,
                    label=name, alpha=0.85)
    ax.set_xticks(x, [s["condition"] for s in summary], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out R² / CKA")
    ax.set_xlabel(xlabel)
    ax.set_ylim(min(0.0, min(s["perm_r2_ab"] for s in summary) - 0.05), 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _finish(fig, path, command)


def fig_heatmaps(result: ExperimentResult, path: Path, command: str) -> None:
    """|correlation| of A's units (rows) with B's (columns), B reordered by the Hungarian assignment."""
    plt = _plt()
    labels = list(result.examples)
    fig, axes = plt.subplots(1, len(labels), figsize=(2.9 * len(labels) + 0.6, 3.3), squeeze=False)
    for ax, label in zip(axes[0], labels):
        res = result.examples[label][0]
        corr = np.abs(res.corr)
        order_b = [j for j in res.perm_b if j >= 0]
        order_b += [j for j in range(corr.shape[1]) if j not in set(order_b)]
        im = ax.imshow(corr[:, order_b], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{label}\n1-to-1/lin {res.scores['one_to_one']:.2f}", fontsize=8)
        ax.set_xlabel("B unit (assigned order)", fontsize=7)
        ax.set_ylabel("A unit", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="|corr| (held-out)")
    _finish(fig, path, command)


def fig_pca(result: ExperimentResult, path: Path, command: str, max_panels: int = 4) -> None:
    """B's held-out latents (dots) and A's mapped into B by the linear map (crosses) on B's top-2 PCs."""
    plt = _plt()
    labels = list(result.examples)
    if len(labels) > max_panels:  # the extremes and evenly spaced ones between
        labels = [labels[i] for i in np.linspace(0, len(labels) - 1, max_panels).round().astype(int)]
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        res, za_te, zb_te, y = result.examples[label]
        mu = zb_te.mean(0)
        _, _, vt = np.linalg.svd(zb_te - mu, full_matrices=False)
        pb = (zb_te - mu) @ vt[:2].T
        pa = (res.lmap.predict_b(za_te) - mu) @ vt[:2].T
        sel = np.random.default_rng(0).choice(len(y), min(250, len(y)), replace=False)
        ax.scatter(pb[sel, 0], pb[sel, 1], c=y[sel], cmap="tab10", s=10, vmin=0, vmax=9, alpha=0.7)
        ax.scatter(pa[sel, 0], pa[sel, 1], c=y[sel], cmap="tab10", s=12, marker="x", vmin=0, vmax=9, alpha=0.7)
        ax.set_title(f"{label}\nlin R² A→B {res.scores['lin_r2_ab']:.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("B latents (•) and A latents mapped into B (×), colour = digit", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    _finish(fig, path, command)


def fmt(v: float, sd: float | None = None, digits: int = 3) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    s = f"{v:.{digits}f}"
    return s + (f" ± {sd:.{digits}f}" if sd is not None and sd > 0 else "")


def summary_table(summary: list[dict], cols=HEADLINE) -> list[str]:
    lines = ["| condition | " + " | ".join(name for _, name in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for s in summary:
        cells = [fmt(s[c], s[c + "_sd"], 1 if c == "eff_dim" else 3) for c, _ in cols]
        lines.append(f"| {s['condition']} | " + " | ".join(cells) + " |")
    return lines


def write_report(result: ExperimentResult, out: Path, title: str, intro: list[str], hypothesis: str,
                 verdict: str, extra: list[str] | None = None) -> Path:
    """``report.md`` with the standard tables and figures plus the experiment's ``extra`` markdown."""
    cfg = result.cfg
    command = cfg.command(out.parent)
    summary = summarize(result.rows, SUMMARY_COLS)
    write_csv(out / "tables" / "pairs.csv", result.rows, command)
    write_csv(out / "tables" / "summary.csv", summary, command)
    fig_curve(summary, out / "figures" / "curve.png", command, f"{cfg.name}: held-out R² vs size of the difference")
    fig_heatmaps(result, out / "figures" / "heatmaps.png", command)
    fig_pca(result, out / "figures" / "pca.png", command)
    cond_rows = [f"| {c.label} | {c.level:g} | `{c.a.label()}` | " +
                 ("A with its latent units permuted" if c.permuted else f"`{c.b.label()}`") +
                 (f" | layer {c.layer}" if c.layer >= 0 else " | latent") + " |" for c in result.conditions]
    lines = [
        f"<!-- Regenerate with: {command} -->",
        f"# Experiment `{cfg.name}`: {title}",
        "",
        *intro,
        "",
        f"**Hypothesis.** {hypothesis}",
        "",
        f"**Verdict.** {verdict}",
        "",
        f"Run: {cfg.reps} repetition(s) per condition (A seed 100+r, B seed 200+r), {cfg.epochs} epochs per "
        f"network, MLP map {cfg.mlp_steps} steps; {result.seconds:.0f} s on this machine. Options: "
        "`config.json`. Measures and their formulas: `diffkit/experiments/measures.py`; maps fitted on the "
        "latents of the digits' 1,200 train images, every score on the 597 held-out images.",
        "",
        "## Conditions",
        "",
        "| condition | difference level | model A | model B | compared |",
        "|---|---|---|---|---|",
        *cond_rows,
        "",
        f"## Results (mean ± sd over {cfg.reps} repetition(s); table `tables/summary.csv`, every pair in "
        f"`tables/pairs.csv`; `{command}`)",
        "",
        *summary_table(summary),
        "",
        "lin/MLP R²: held-out FVE of the affine least-squares / one-hidden-layer MLP map; 1-to-1 R²: the best "
        "unit-to-unit map (Hungarian on |corr|); 1-to-1 / lin: 1 = the correspondence is a permutation of units; "
        "eff. dim: canonical correlations ≥ 0.5.",
        "",
        f"![error vs difference](figures/curve.png)\n\n*Figure: held-out R² of each map and linear CKA per "
        f"condition, mean ± sd (`{command}`).*",
        "",
        f"![correlation heatmaps](figures/heatmaps.png)\n\n*Figure: |correlation| between A's and B's latent "
        f"units on held-out inputs, B's columns in the order of the Hungarian assignment (a bright diagonal = "
        f"one-to-one; diffuse = mixed), repetition 0 (`{command}`).*",
        "",
        f"![PCA of aligned latents](figures/pca.png)\n\n*Figure: PCA (B's top two components) of B's held-out "
        f"latents and of A's latents carried into B by the linear map, repetition 0 (`{command}`).*",
        "",
        *(extra or []),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
