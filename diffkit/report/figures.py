"""The report's figures: matplotlib (Agg), labelled, with the regenerating command in a footer.

Each function takes the report's runs (:class:`diffkit.report.RunData`; the first is the main
comparison, the others controls) and writes one PNG. Files carry no software/date metadata, so the
same numbers give the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

STYLES = ("-", "--", ":", "-.")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
SIDE_NAMES = {"a": "A", "b": "B"}


def agg_pyplot():
    """matplotlib.pyplot on the Agg backend with the report's style (other reports may use it too)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 100, "axes.grid": True,
                         "grid.alpha": 0.3, "legend.fontsize": 8})
    return plt


def save_figure(fig: Any, path: Path, command: str) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically, no metadata) with a footer naming ``command``."""
    from ..io import atomic_write_bytes

    fig.text(0.01, 0.005, f"regenerate: {command}", fontsize=7, color="0.45", ha="left", va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def assigned_similarity(align_table: Any) -> np.ndarray:
    """Similarity of every pair the assignment made (shared rows, and A-only rows that had a partner)."""
    t = align_table
    sim = t.similarity[(t.kind == "shared") | (t.kind == "a_only")].to_numpy(np.float64)
    return sim[np.isfinite(sim)]


def alignment(runs: list, path: Path, command: str) -> Path:
    """Left: similarity of the assigned SAE pairs per run. Right: bridge cosines (crosscoder ↔ SAE) of the main run."""
    plt = agg_pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(-0.2, 1.0, 49)
    for n, run in enumerate(runs):
        sim = assigned_similarity(run.align_table)
        ax1.hist(sim, bins=bins, histtype="step", linewidth=1.6, linestyle=STYLES[n % 4], color=COLORS[n % 4],
                 label=f"{run.label} (median {np.median(sim):.2f})")
    thr = runs[0].align_summary["threshold"]
    ax1.axvline(thr, color="k", linewidth=1, linestyle=":")
    ax1.text(thr, ax1.get_ylim()[1] * 0.95, f" threshold {thr:g}", fontsize=8, va="top")
    ax1.set(xlabel="cosine of A's carried decoder direction with its assigned B direction",
            ylabel="SAE feature pairs", title="Training-free diff: similarity of assigned pairs")
    ax1.legend(loc="upper left")
    main = runs[0]
    cbins = np.linspace(0.0, 1.0, 41)
    thr_b = main.summary["config"]["bridge_threshold"]
    for n, side in enumerate(("a", "b")):
        cos = main.bridge[main.bridge.side == side].bridge_cos.to_numpy(np.float64)
        cos = cos[np.isfinite(cos)]
        ax2.hist(cos, bins=cbins, histtype="step", linewidth=1.6, color=COLORS[n],
                 label=f"SAE {SIDE_NAMES[side]} features (median {np.median(cos):.2f})" if len(cos) else side)
    ax2.axvline(thr_b, color="k", linewidth=1, linestyle=":")
    ax2.set(xlabel="cosine: crosscoder latent's decoder block vs its SAE feature",
            ylabel="SAE features", title=f"Bridge ({main.label}): crosscoder latents ↔ SAE features")
    ax2.legend(loc="upper left")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path, command)


def relative_norms(runs: list, path: Path, command: str) -> Path:
    """Histogram of the crosscoder's relative decoder norm r over live latents, one curve per run."""
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    bins = np.linspace(0, 1, 51)
    for n, run in enumerate(runs):
        live = run.latents[~run.latents.dead]
        ax.hist(live.rel_norm_r_b, bins=bins, histtype="step", linewidth=1.6, linestyle=STYLES[n % 4],
                color=COLORS[n % 4], label=f"{run.label} ({len(live):,} live latents)")
    for x in (0.1, 0.3, 0.7, 0.9):
        ax.axvline(x, color="0.4", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set(xlabel="r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖)   (0: A-only, 0.5: shared, 1: B-only; lines at 0.1, 0.3, 0.7, 0.9)",
           ylabel="latents (log scale)", title="Crosscoder: relative decoder norms")
    ax.legend(loc="upper left")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path, command)


def scatter(run: Any, path: Path, command: str) -> Path:
    """The two methods' scores on the same features: exclusivity each side, and strength of shared pairs."""
    plt = agg_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, side in zip(axes[:2], ("a", "b")):
        b = run.bridge[(run.bridge.side == side) & (run.bridge.latent >= 0)]
        flag = b.align_flag.to_numpy(bool)
        ax.scatter(b.align_excl[~flag], b.cc_excl[~flag], s=6, alpha=0.5, color=COLORS[0], label="align: shared")
        ax.scatter(b.align_excl[flag], b.cc_excl[flag], s=6, alpha=0.6, color=COLORS[1],
                   label=f"align: {SIDE_NAMES[side]}-only")
        rho = run.summary["agreement"][side]["spearman_excl"]
        own = "1 − r" if side == "a" else "r"
        ax.set(xlabel="align exclusivity: 1 − similarity of the assigned pair",
               ylabel=f"crosscoder share of {SIDE_NAMES[side]}: {own}",
               title=f"SAE {SIDE_NAMES[side]} features ({len(b):,} bridged), Spearman ρ = {_f(rho)}")
        ax.legend(loc="best", markerscale=2)
    ax = axes[2]
    shared = run.align_table[run.align_table.kind == "shared"]
    a = run.bridge[run.bridge.side == "a"].set_index("feature")
    bb = run.bridge[run.bridge.side == "b"].set_index("feature")
    la, lb = a.latent.reindex(shared.feature_a).to_numpy(), bb.latent.reindex(shared.feature_b).to_numpy()
    keep = (la >= 0) & (la == lb)
    r = a.cc_r.reindex(shared.feature_a).to_numpy()[keep]
    ax.scatter(shared.act_mass_log_ratio.to_numpy()[keep], 1 - 2 * r, s=6, alpha=0.5, color=COLORS[2])
    ax.axhline(0, color="0.4", linewidth=0.8)
    ax.axvline(0, color="0.4", linewidth=0.8)
    rho = run.summary["agreement"]["pairs"]["spearman_strength"]
    ax.set(xlabel="align: activation-mass log ratio log(A / B), centred",
           ylabel="crosscoder: 1 − 2r  (A-leaning > 0)",
           title=f"Shared pairs on one latent ({int(keep.sum()):,}), Spearman ρ = {_f(rho)}")
    fig.suptitle(f"{run.label}: the same features scored by both methods", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path, command)


def precision_at_k(runs: list, path: Path, command: str) -> Path:
    """Overlap of the top-k most exclusive features by each method, per side, for every run."""
    plt = agg_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, side in zip(axes, ("a", "b")):
        for n, run in enumerate(runs):
            c = run.curves[run.curves.side == side]
            if not len(c):
                continue
            ax.plot(c.k, c.precision_at_k, linestyle=STYLES[n % 4], color=COLORS[n % 4], linewidth=1.5,
                    label=run.label)
            if n == 0:
                ax.plot(c.k, c.chance, color="0.5", linewidth=1, linestyle=":", label="chance (k / n)")
                flags = run.summary["agreement"][side]["align_flags_bridged"]
                if 0 < flags <= len(c):
                    ax.axvline(flags, color=COLORS[0], linewidth=0.8, linestyle=":")
                    ax.text(flags, 0.97, f" k = align's {SIDE_NAMES[side]}-only count", fontsize=7, color=COLORS[0],
                            va="top")
        ax.set_xscale("log")
        ax.set(xlabel="k (most exclusive features by each method)", ylim=(0, 1.02),
               title=f"SAE {SIDE_NAMES[side]} features: top-k overlap")
        ax.legend(loc="upper left")
    axes[0].set_ylabel("precision@k = |top-k align ∩ top-k crosscoder| / k")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path, command)


def _f(x: Any) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.2f}"
