"""The report of ``diffkit bench groundtruth``: report.md, figures/*.png, tables/*.csv (results in, files out).

Every figure carries the regenerating command in a footer (:func:`diffkit.report.figures.save_figure`,
the same helper as ``diffkit report``); every table is written as a CSV and named, with the command,
under its markdown copy.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..report.figures import agg_pyplot, save_figure
from ..io import atomic_write_bytes
from .groundtruth import AXES, CaseResult, GroundTruthResult, _describe, command_line
from .groundtruth_score import METHODS

AXIS_LABELS = {"frac_exclusive": "fraction of each model's features that are exclusive",
               "noise": "noise (std relative to the mean feature-sum norm)",
               "superposition": "superposition (planted features per dimension)"}
COLORS = {"align": "#1f77b4", "crosscoder": "#d62728"}
NAMES = {"align": "training-free (align)", "crosscoder": "crosscoder"}


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _save(fig: Any, path: Path, command: str) -> str:
    """Save with the report package's footer and return the markdown image link."""
    save_figure(fig, path, command)
    return f"![{path.stem}](figures/{path.name})"


class _Tables:
    def __init__(self, out: Path, command: str):
        self.dir, self.command = out / "tables", command
        self.dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, df: Any, shown: list[str] | None = None) -> list[str]:
        """Write ``tables/NAME.csv``; return its markdown (``shown`` columns) naming the CSV and the command."""
        atomic_write_bytes(self.dir / f"{name}.csv", df.to_csv(index=False, float_format="%.6g").encode())
        df = df[shown] if shown else df
        lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
        lines += ["| " + " | ".join(_fmt(v) if isinstance(v, float) else str(v).replace("|", "\\|")
                                    for v in row) + " |" for row in df.itertuples(index=False)]
        return lines + ["", f"<sub>Table `tables/{name}.csv` · regenerate: `{self.command}`</sub>", ""]


def main_rows(case: CaseResult, control: CaseResult) -> list[tuple[str, Any, Any]]:
    s, c = case.scores, control.scores
    rows: list[tuple[str, Any, Any]] = []

    def row(name: str, get) -> None:
        rows.append((name, *(get(m) for m in METHODS)))

    row("planted A features recovered (cos ≥ τ)", lambda m: s.recovered[m]["a"])
    row("planted B features recovered (cos ≥ τ)", lambda m: s.recovered[m]["b"])
    for side, name in (("a_only", "A-only"), ("b_only", "B-only")):
        row(f"{name}: AUROC", lambda m: s.detection[m][side].auroc)
        row(f"{name}: precision@k (k = planted {name} items)", lambda m: s.detection[m][side].precision_at_k)
        row(f"{name}: default rule, TPR", lambda m: s.detection[m][side].rule_tpr)
        row(f"{name}: default rule, FPR (shared items called {name})", lambda m: s.detection[m][side].rule_fpr)
        row(f"{name}: found (planted {name} features recovered and called {name})",
            lambda m: s.detection[m][side].found)
    row("shared: matching accuracy", lambda m: s.matching[m]["accuracy"])
    row("shared: matching precision", lambda m: s.matching[m]["precision"])
    row("changed strength: AUROC (align |mean_act_log_ratio − median|, crosscoder |r − median r|)",
        lambda m: s.changed[m]["|mean_act_log_ratio - median|" if m == "align" else "|r - median r|"])
    row("changed strength: AUROC of align's default ranking |act_mass_log_ratio|",
        lambda m: s.changed[m].get("|act_mass_log_ratio|", float("nan")))
    row("changed strength: AUROC of the original method's |enc_norm_diff_robust|",
        lambda m: s.changed[m].get("|enc_norm_diff_robust|", float("nan")))
    for side, name in (("a_only", "A-only"), ("b_only", "B-only")):
        row(f"{name}: found, uncalibrated rule (align: unmatched; crosscoder: r alone)",
            lambda m: s.detection_uncalibrated[m][side].found if s.detection_uncalibrated else float("nan"))
        row(f"{name}: AUROC of 1 − retention (model-level score of diffkit.calibrate)",
            lambda m: s.auroc_retention.get(m, {}).get(side, float("nan")))
    row("calls at the FDR (calibrated rule): exclusive / uncalibrated-rule calls, main case",
        lambda m: f"{s.counts[m]['exclusive']} / {s.counts[m].get('unmatched', '–')}")
    row("seed-pair control: FPR, live latents", lambda m: c.fpr[m]["live"])
    row("seed-pair control: FPR, live latents, uncalibrated rule", lambda m: c.fpr[m].get("live_uncalibrated", float("nan")))
    row("seed-pair control: FPR, recovered latents", lambda m: c.fpr[m]["recovered"])
    rows.append(("wall time, s (align: map + align; SAE training listed below)", case.seconds["align"],
                 case.seconds["crosscoder"]))
    return rows


def _mean(*values: float) -> float:
    """Mean of the values that are not NaN (NaN if none is)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def sweep_frame(result: GroundTruthResult, axis: str) -> Any:
    import pandas as pd

    records = []
    for value, case in result.sweep[axis]:
        for m in METHODS:
            h = case.scores.headline(m)
            records.append({axis: value, "method": m, **h,
                            "auroc_mean": _mean(h["auroc_a_only"], h["auroc_b_only"]),
                            "p_at_k_mean": _mean(h["p_at_k_a_only"], h["p_at_k_b_only"]),
                            "found_mean": _mean(h["found_a_only"], h["found_b_only"]),
                            "recovered_a": case.scores.recovered[m]["a"], "recovered_b": case.scores.recovered[m]["b"],
                            "sae_fvu_a": case.sae_fvu["a"], "cc_fve_a": case.cc_fve["a"], "map_fve": case.map_fve})
    return pd.DataFrame.from_records(records)


def _sweep_figure(df: Any, axis: str, path: Path, command: str) -> str:
    plt = agg_pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    panels = (("auroc_mean", "exclusive AUROC"), ("p_at_k_mean", "exclusive precision@k"),
              ("found_mean", "exclusive features found"), ("match_accuracy", "shared matching accuracy"))
    for ax, (col, title) in zip(axes, panels):
        for m in METHODS:
            d = df[df.method == m]
            ax.plot(d[axis], d[col], marker="o", color=COLORS[m], label=NAMES[m])
        ax.set_xlabel(AXIS_LABELS[axis], fontsize=8)
        ax.set_ylabel(title + (" (mean of A-only, B-only)" if "exclusive" in title else ""), fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="lower left")
    fig.suptitle(f"Planted ground truth: scores vs {axis.replace('_', ' ')}")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path, command)


def _precision_figure(case: CaseResult, path: Path, command: str) -> str:
    plt = agg_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, side, name in zip(axes, ("a_only", "b_only"), ("A-only", "B-only")):
        for m in METHODS:
            d = case.scores.detection[m][side]
            ax.plot(np.arange(1, len(d.curve) + 1), d.curve, color=COLORS[m], label=f"{NAMES[m]} (AUROC {d.auroc:.3f})")
            ax.axvline(d.k, color=COLORS[m], linestyle=":", linewidth=1)
        ax.set_xlabel("k (items ranked by differentness score)")
        ax.set_ylabel(f"precision@k ({name} items)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{name} detection (dotted: k = planted {name} items)")
        ax.legend()
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path, command)


def planted_shift(method: str, unchanged: float, factor: float) -> float:
    """Where a changed feature would sit if only its planted factor moved it off the unchanged median.

    align: ``log ratio − log factor`` (B's activation ×factor); crosscoder: B's decoder norm ×factor,
    ``r' = f·u / (1 − u + f·u)`` for the unchanged median ``u`` (below 0.5 when B's normalization scale
    is smaller, as here: the changed features make B's activations larger on average).
    """
    if method == "align":
        return unchanged - math.log(factor)
    return factor * unchanged / (1 - unchanged + factor * unchanged)


def _changed_figure(case: CaseResult, factor: float, path: Path, command: str) -> str:
    plt = agg_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    specs = (("align", "mean_act_log_ratio = log(mean act A / mean act B)"),
             ("crosscoder", "relative decoder norm r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖)"))
    for ax, (m, label) in zip(axes, specs):
        ch = case.scores.changed[m]
        expected = planted_shift(m, ch["median_unchanged"], factor)
        v, lab = np.asarray(ch["values"]), np.asarray(ch["is_changed"], bool)
        if len(v):
            bins = np.linspace(v.min(), v.max() + 1e-9, 31)
            ax.hist(v[~lab], bins=bins, color="0.6", label=f"unchanged shared ({int((~lab).sum())})")
            ax.hist(v[lab], bins=bins, color=COLORS[m], alpha=0.8, label=f"changed ×{factor:g} in B ({int(lab.sum())})")
        ax.axvline(expected, color="k", linestyle=":", linewidth=1,
                   label=f"unchanged median shifted by the planted ×{factor:g}: {expected:.2f}")
        ax.set_xlabel(label)
        ax.set_ylabel("correctly matched shared features")
        ax.set_title(NAMES[m])
        ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path, command)


def write_groundtruth_report(result: GroundTruthResult, out: str | Path) -> Path:
    """Write report.md, figures/*.png and tables/*.csv under ``out``; return the report's path."""
    import pandas as pd

    out = Path(out)
    cfg, main, control = result.config, result.main, result.control
    command = command_line(cfg)
    tables = _Tables(out, command)
    figs = out / "figures"
    p = main.planted
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    size = "quick mode (small sizes: a check that it runs, not numbers to quote)" if cfg.quick else "default size"
    lines = [f"<!-- Generated by: {command} -->", "# Planted ground truth: training-free diff vs crosscoder", "",
             f"Run {when}, {size}, "
             f"{result.seconds:.0f} s on {cfg.threads} torch threads. Regenerate with `{command}`; the options are in "
             "`config.json`.", "",
             "## What was planted", "",
             f"Main case: {_describe(p)}; feature frequencies Zipf (exponent {p.zipf:g}); mean {p.k:g} active features "
             f"per token. B's dictionary is A's carried through a random rotation, stored in a random order. "
             f"The generator is `diffkit.synthetic` (`planted_config`, `make_planted`).", "",
             "Each case is the pipeline (`diffkit run`'s stages) on the packaged `groundtruth` config with "
             "`data.store` set to the planted store and the sizes below filled in. "
             "Each side gets a real sae-lens TopK SAE trained by sae-lens's `SAETrainer` on the store's shuffled "
             f"raw batches ({cfg.sae_width:g}× its planted features, k = {max(1, round(p.k))}, {cfg.sae_steps} steps × "
             f"{cfg.sae_batch}, seeds {cfg.seed} and {cfg.seed + 1}), saved in sae-lens's format and loaded by "
             "`diffkit.saes.load_sae`. **align**: "
             "`LinearMap().fit(store)` + `diffkit.diff.align` at its defaults (cosine cost, threshold 0.5, "
             "calibrated verdict at FDR 0.1). "
             f"**crosscoder**: BatchTopK, {cfg.cc_width:g}× the pair's planted features, {cfg.cc_steps} steps × "
             f"{cfg.cc_batch}, then `analyze` over every token (labels: A-only r ≤ 0.1, B-only r ≥ 0.9; calibrated "
             "verdict at FDR 0.1). Both read the same ActivationStore. Wall times are the ones the artifacts record "
             "(map fit + align; crosscoder training + analysis).", "",
             "Default rules are **calibrated** (`diffkit.calibrate`): a feature is called exclusive when the method's "
             "own criterion says so (align: unmatched; crosscoder: r ≤ 0.1 / ≥ 0.9) *and* the model-level evidence "
             "survives a null at FDR 10%: *retention* = held-out R² of an affine probe predicting the feature's "
             "activation from the other model's residual ÷ the same from its own model's residual, its p-value "
             "against the retentions of features the method calls shared, Benjamini–Hochberg q ≤ 0.1. The "
             "uncalibrated rules are scored beside them.", "",
             "## How it is scored", "",
             f"- **Recovery**: a learned latent recovers planted feature f when the one-to-one (Hungarian) assignment "
             f"of its decoder direction to the generating dictionary pairs it with f at cosine ≥ τ = "
             f"{cfg.recover_threshold:g} (crosscoder: its A block against A's dictionary, its B block against B's). "
             "Items below are recovered latents, labelled by their feature's class.",
             "- **Exclusive detection** (A-only; B-only symmetric): items are latents recovering an A feature; "
             "positives those whose feature is A-only. Scores: align `1 − s`, s = similarity of the pair the "
             "assignment gave the latent (−1 if none), so its uncalibrated rule *unmatched* is `score > 0.5`; "
             "crosscoder `1 − r` "
             "(B side: `r`), `r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖)`. AUROC = P(positive scores above negative), ties half. "
             "precision@k = planted-exclusive fraction of the k top-scored items, k = number of positive items. "
             "TPR / FPR: fraction of positive / negative items the method's own rule calls exclusive. *Found*: "
             "planted exclusive features recovered by a latent the rule calls exclusive / all planted exclusive "
             "features (recovery and decision together).",
             "- **Shared matching accuracy**: over planted shared features whose two sides are both recovered, the "
             "fraction that align matched as exactly that pair of SAE latents (at its threshold) / that one crosscoder "
             "latent recovers on both sides without being labelled exclusive. **Precision**: of the pairs a method "
             "calls shared with both sides recovered, the fraction on one planted feature.",
             "- **Changed strength**: over correctly matched shared features, AUROC of planted-changed vs unchanged for "
             "align's `|mean_act_log_ratio − median|` (`log((mean_act_a + ε)/(mean_act_b + ε))`, see "
             "`diffkit.diff`), its default ranking `|act_mass_log_ratio|` and the original method's "
             "`|enc_norm_diff_robust|`, and for the crosscoder's "
             "`|r − median r|` (medians over the same items).",
             "- **Seed-pair control FPR**: a pair with identical feature sets (no exclusive or changed features; B "
             f"rotated), SAE seeds {cfg.seed} and {cfg.seed + 1}: the fraction of live latents (fired on the store) "
             "each method calls exclusive at its default rule; also over recovered latents only.", ""]

    lines += ["## Headline (main case)", ""]
    head = pd.DataFrame(main_rows(main, control), columns=["metric", "align", "crosscoder"])
    lines += tables.add("main", head)
    lines += [f"SAE training for align: {main.seconds['saes']:.0f} s for both (not needed when SAEs exist); held-out "
              f"FVU A {main.sae_fvu['a']:.3f}, B {main.sae_fvu['b']:.3f}. Map held-out FVE A→B {main.map_fve:.3f}. "
              f"Crosscoder held-out FVE A {main.cc_fve['a']:.3f}, B {main.cc_fve['b']:.3f}.", "",
              _precision_figure(main, figs / "precision_at_k.png", command), ""]
    curves = [{"method": m, "side": side, "k": i + 1, "precision": v} for m in METHODS for side in ("a_only", "b_only")
              for i, v in enumerate(main.scores.detection[m][side].curve)]
    lines += [f"<sub>Figure `figures/precision_at_k.png` (data: `tables/precision_at_k.csv`) · regenerate: "
              f"`{command}`</sub>", ""]
    tables.add("precision_at_k", pd.DataFrame.from_records(curves))

    lines += ["## Changed strength", "",
              f"{p.n_changed} shared features fire with {p.change_factor:g}× their coefficient in B. If only that "
              f"factor moved them: align's mean_act_log_ratio at the unchanged median − log {p.change_factor:g} "
              f"({planted_shift('align', main.scores.changed['align']['median_unchanged'], p.change_factor):.2f} here); "
              f"the crosscoder's r at f·u / (1 − u + f·u), u the unchanged median "
              f"({planted_shift('crosscoder', main.scores.changed['crosscoder']['median_unchanged'], p.change_factor):.2f}"
              " here; u < 0.5 since each model is normalized to mean norm √d and the stronger features make B's raw "
              "norm larger). A TopK SAE's latent for "
              "a stronger feature also wins the top-k more often, so its mean activation grows by more than the factor.",
              ""]
    ch = pd.DataFrame([{"method": m, "score": name, "auroc": val,
                        "medians_of": "mean_act_log_ratio" if m == "align" else "r", "median_changed": c["median_changed"],
                        "median_unchanged": c["median_unchanged"], "items": c["n"], "changed_items": c["n_changed"]}
                       for m in METHODS for c in [main.scores.changed[m]]
                       for name, val in c.items() if name.startswith("|")])
    lines += tables.add("changed_strength", ch)
    lines += [_changed_figure(main, p.change_factor, figs / "changed_strength.png", command), "",
              f"<sub>Figure `figures/changed_strength.png` · regenerate: `{command}`</sub>", ""]

    lines += ["## Seed-pair negative control", "", f"{_describe(control.planted)}. Nothing is exclusive, so every "
              "latent a method calls exclusive is a false positive.", ""]
    ctl = pd.DataFrame([{"method": m, "live_latents": control.scores.counts[m]["live"],
                         "called_exclusive": control.scores.counts[m]["exclusive"],
                         "fpr_live": control.scores.fpr[m]["live"], "fpr_recovered": control.scores.fpr[m]["recovered"],
                         "called_uncalibrated": control.scores.counts[m].get("unmatched", float("nan")),
                         "fpr_live_uncalibrated": control.scores.fpr[m].get("live_uncalibrated", float("nan")),
                         "recovered_a": control.scores.recovered[m]["a"], "recovered_b": control.scores.recovered[m]["b"],
                         "match_accuracy": control.scores.matching[m]["accuracy"]} for m in METHODS])
    lines += tables.add("control", ctl)

    lines += ["## Difficulty sweep", "", "One axis at a time, the others at the main case's values (the main case is "
              "the sweep point at those values).", ""]
    for axis in AXES:
        df = sweep_frame(result, axis)
        lines += [f"### {AXIS_LABELS[axis]}", "", _sweep_figure(df, axis, figs / f"sweep_{axis}.png", command), "",
                  f"<sub>Figure `figures/sweep_{axis}.png` · regenerate: `{command}`</sub>", ""]
        lines += tables.add(f"sweep_{axis}", df, [axis, "method", "auroc_mean", "p_at_k_mean", "found_mean",
                                                  "match_accuracy", "recovered_a", "recovered_b", "fpr_live"])
    lines += ["## Caveats", "",
              "- Items are recovered latents only; a feature an SAE or the crosscoder never learned is in no item "
              "(see the recovery rows). align needs *both* SAEs to learn a shared feature to match it; a shared "
              "feature learned by one SAE only is unmatched (its calibrated verdict asks the other model's residual, "
              "which still carries it, so it is not called exclusive).",
              "- The calibrated rules never call a latent its own model's residual cannot linearly predict (held-out "
              "R² < 0.05: no model-level evidence either way); junk latents of the wider-than-planted SAEs are such.",
              "- SAEs wider than their planted dictionary leave latents that recover nothing; align's assignment "
              "leaves them unmatched, so its uncalibrated FPR over live latents counts them — the FPR over recovered "
              "latents does not, and the calibrated verdict does not call them.",
              "- One seed per point; the sweep curves show trends, not confidence intervals.", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def format_groundtruth_summary(result: GroundTruthResult) -> str:
    """The printed summary: the main case's scores and the control's false-positive rates, per method."""
    main, control = result.main.scores, result.control.scores
    lines = [f"{'':<12}{'AUROC A/B-only':>16}{'P@k A/B-only':>14}{'found A/B-only':>16}{'match acc':>10}"
             f"{'changed AUROC':>14}{'control FPR':>12}"]
    for m in METHODS:
        h = main.headline(m)
        changed = main.changed[m]["|mean_act_log_ratio - median|" if m == "align" else "|r - median r|"]
        pair = lambda key: f"{_fmt(h[key + '_a_only'], 2)}/{_fmt(h[key + '_b_only'], 2)}"  # noqa: E731
        lines.append(f"{m:<12}{pair('auroc'):>16}{pair('p_at_k'):>14}{pair('found'):>16}"
                     f"{_fmt(h['match_accuracy']):>10}{_fmt(changed):>14}{_fmt(control.fpr[m]['live']):>12}")
    lines.append("control FPR: live latents called exclusive (calibrated rule, FDR 0.1) on the seed pair (no exclusive "
                 f"features planted); over recovered latents: align {_fmt(control.fpr['align']['recovered'])}, "
                 f"crosscoder {_fmt(control.fpr['crosscoder']['recovered'])}; uncalibrated rule, live: align "
                 f"{_fmt(control.fpr['align'].get('live_uncalibrated', float('nan')))}, crosscoder "
                 f"{_fmt(control.fpr['crosscoder'].get('live_uncalibrated', float('nan')))}")
    return "\n".join(lines)
