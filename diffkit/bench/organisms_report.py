"""The report of ``diffkit bench organisms``: report.md (the finding first), figures/*.png, tables/*.csv, summary.json.

Tables go through :class:`diffkit.report.markdown.Tables` (CSV beside the markdown, the command
under each) and figures through :func:`diffkit.report.figures.save_figure` (the command in a footer).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..report.figures import agg_pyplot, save_figure
from ..report.markdown import Tables, fmt_num, md_context
from ..io import atomic_write_bytes, atomic_write_json
from .organisms import CASES, command_line
from ..divergence import PRIOR_FIRINGS as PRIOR
from .organisms_score import DEFAULT_FACTOR, share_threshold

TARGET_CASES = ("backdoor", "facts")
CONTROL_CASES = ("null", "null_facts", "sae_seed")
TRAINING = ("crosscoder batchtopk", "crosscoder l1")  # the methods that train something on the store


def targets(summary: dict) -> dict:
    """Per method: does it meet the issue's targets? (rank ≤ 5, p@10 ≥ 0.5, token AUROC ≥ 0.95 on backdoor and facts;
    p@10 ≤ 0.1 on every control). A case that did not run is reported as missing, never as met."""
    orgs = summary["organisms"]
    methods = sorted({m for case in orgs.values() for m in case})
    out = {}
    for m in methods:
        checks, missing = {}, []
        for c in TARGET_CASES:
            e = orgs.get(c, {}).get(m)
            if e is None:
                missing.append(c)
                continue
            rank, p10, tok = e.get("first_planted_rank"), e.get("precision_at_10"), e.get("token_auroc")
            checks[f"{c}: first planted rank <= 5"] = rank is not None and rank <= 5
            checks[f"{c}: precision@10 >= 0.5"] = p10 is not None and p10 >= 0.5
            checks[f"{c}: token AUROC >= 0.95"] = tok is not None and tok >= 0.95
        for c in CONTROL_CASES:
            e = orgs.get(c, {}).get(m)
            if e is None:
                missing.append(c)
                continue
            checks[f"{c}: precision@10 <= 0.1"] = e.get("precision_at_10") is not None and e["precision_at_10"] <= 0.1
        out[m] = {"meets_all": bool(checks) and all(checks.values()) and not missing, "checks": checks,
                  "missing": missing, "n_met": int(sum(checks.values())), "n_checks": len(checks),
                  "training_free": m not in TRAINING}
    return out


CALL_SHARE_MAX = 0.05  # the calibration issue's target: calls on a control at most 5% of the live features


def calibration_targets(summary: dict) -> dict:
    """align's calibrated verdict (at its FDR): on the controls at most 5% of live features called; on
    backdoor and facts, planted features among the calls. A case that did not run is missing, never met."""
    cal = summary.get("calibrated", {})
    checks, missing = {}, []
    for c in CONTROL_CASES:
        if c not in cal:
            missing.append(c)
            continue
        share = cal[c]["called_share_of_live"]
        checks[f"{c}: calls <= {100 * CALL_SHARE_MAX:g}% of live features"] = share is not None and share <= CALL_SHARE_MAX
    for c in TARGET_CASES:
        if c not in cal:
            missing.append(c)
            continue
        checks[f"{c}: planted features among the calls"] = cal[c]["planted_b_called"] > 0
    return {"meets_all": bool(checks) and all(checks.values()) and not missing, "checks": checks, "missing": missing}


def _calibrated_table(summary: dict, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for case, c in summary.get("calibrated", {}).items():
        calls = c["calls"]
        rows.append({"case": case, "control": "yes" if case in CONTROL_CASES else "no",
                     "A-only": calls.get("a_only"), "B-only": calls.get("b_only"), "changed": calls.get("changed"),
                     "of them by map error": c["changed_by_map_error"],
                     "called / live features": f"{c['called_features']} / {c['live_features']}",
                     "share": fmt_num(c["called_share_of_live"]),
                     "B's planted called": f"{c['planted_b_called']} of {c['planted_b']}",
                     "planted share of B's calls": fmt_num(c["called_b_planted_share"], 2)})
    return tables.add("calibrated_calls", pd.DataFrame(rows)) if rows else ["(no calibrated verdict in this run)", ""]


def summary_json(result: dict) -> dict:
    cfg = result["config"]
    orgs = {name: {m: {k: v for k, v in e.items() if k != "note"} for m, e in cr.metrics.items()}
            for name, cr in result["cases"].items()}
    s = {"command": command_line(cfg), "organisms": orgs, "missing": result["missing"],
         "planted_counts": {n: cr.planted_counts for n, cr in result["cases"].items()},
         "label_rates": {n: cr.label_rates for n, cr in result["cases"].items()},
         "map_heldout_fve": {n: cr.map_fve for n, cr in result["cases"].items()},
         "crosscoder": {n: cr.crosscoder for n, cr in result["cases"].items()},
         "seconds": {"total": result["seconds"], **{n: cr.seconds for n, cr in result["cases"].items()}},
         "definition": {"planted": f"share of activation mass on one planted label l >= {DEFAULT_FACTOR:g}x the label's "
                                   "share of the store's tokens, in odds: s/(1-s) >= f rho_l/(1-rho_l)",
                        "precision_at_k": "expected planted fraction of the top k (ties broken at random)",
                        "first_planted_rank": "expected rank of the best-ranked planted item (ties at random)",
                        "auroc": "planted vs not-planted items under the method's score",
                        "token_auroc": "planted (label > 0) vs ordinary tokens under the method's per-token score"}}
    s["calibrated"] = {n: cr.calibrated for n, cr in result["cases"].items() if cr.calibrated}
    s["targets"] = targets(s)
    s["calibration_targets"] = calibration_targets(s)
    return json.loads(json.dumps(s, default=_jsonable).replace("NaN", "null"))


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def best_method(summary: dict, training_free: bool = True) -> str | None:
    """The method meeting most targets (ties: the higher mean precision@10 on backdoor and facts)."""
    t = summary["targets"]
    cands = [m for m in t if t[m]["training_free"] == training_free or not training_free]
    if not cands:
        return None
    orgs = summary["organisms"]

    def key(m: str):
        p = [orgs.get(c, {}).get(m, {}).get("precision_at_10") or 0.0 for c in TARGET_CASES]
        return (t[m]["n_met"], sum(p))

    return max(cands, key=key)


def rank_text(x: Any) -> str:
    """An expected rank as the reports print it: #3, #12.5, or 'none planted'."""
    return "none planted" if x is None else (f"#{x:.0f}" if float(x).is_integer() else f"#{x:.1f}")


def _finding(summary: dict, result: dict) -> list[str]:
    orgs = summary["organisms"]
    best = best_method(summary)
    lines = []
    if best is None or not any(c in orgs for c in TARGET_CASES):
        if not orgs:
            return ["**No case ran** (see *Missing* below): nothing is scored yet.", ""]
        ran = []
        for c, methods in orgs.items():
            ranked = [(m, e["first_planted_rank"]) for m, e in methods.items() if e.get("first_planted_rank") is not None]
            if ranked:
                m, r = min(ranked, key=lambda x: x[1])
                me = methods.get("map-error", {})
                ran.append(f"**{c}**: best first planted rank {rank_text(r)} (`{m}`); map-error {rank_text(me.get('first_planted_rank'))}, "
                           f"precision@10 {fmt_num(me.get('precision_at_10'), 2)}, token AUROC {fmt_num(me.get('token_auroc'))}")
        missing = ", ".join(f"`{c}`" for c in TARGET_CASES if c not in orgs)
        return [f"**The targets' organisms ({missing}) are not built in this checkout** (see *Missing*), so the targets "
                "cannot be judged here. On what ran: " + "; ".join(ran) + ".", ""]
    tb = summary["targets"][best]
    verdict = "meets every target" if tb["meets_all"] else f"meets {tb['n_met']} of {tb['n_checks']} targets"
    parts = []
    for c in TARGET_CASES:
        if c in orgs:
            e = orgs[c][best]
            parts.append(f"on **{c}** its first planted feature is {rank_text(e['first_planted_rank'])}, precision@10 "
                         f"{fmt_num(e['precision_at_10'], 2)}, planted tokens found with AUROC {fmt_num(e.get('token_auroc'))}")
    lines.append(f"**The best training-free method is `{best}`, which {verdict}**: " + "; ".join(parts) + ".")
    ctrl = [f"{c} {fmt_num(orgs[c][best]['precision_at_10'], 2)}" for c in CONTROL_CASES if c in orgs]
    if ctrl:
        lines[-1] += " On the controls (every hit a false positive) its precision@10 is " + ", ".join(ctrl) + "."
    if "backdoor" in orgs:
        b = orgs["backdoor"]
        others = [f"align's B-only list {rank_text(b['align b-only']['first_planted_rank'])}"]
        for m in ("crosscoder batchtopk", "crosscoder l1", "activation-difference"):
            if m in b:
                others.append(f"{m} {rank_text(b[m]['first_planted_rank'])}")
        lines.append("")
        lines.append("On the backdoor, the first planted item of the other methods: " + ", ".join(others) + ".")
    return lines + [""]


def _targets_table(summary: dict, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for m, t in summary["targets"].items():
        row = {"method": m, "training-free": "yes" if t["training_free"] else "no",
               "meets all": "**yes**" if t["meets_all"] else "no", "met": f"{t['n_met']}/{t['n_checks']}",
               "failed": "; ".join(k for k, v in t["checks"].items() if not v) or "–",
               "missing cases": ", ".join(t["missing"]) or "–"}
        rows.append(row)
    df = pd.DataFrame(rows).sort_values(["met"], key=lambda c: c.map(lambda s: -int(s.split("/")[0])), kind="stable")
    return tables.add("targets", df)


def _summary_table(summary: dict, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for case, methods in summary["organisms"].items():
        for m, e in methods.items():
            rows.append({"organism": case, "method": m, "precision@10": e["precision_at_10"],
                         "precision@50": e["precision_at_50"], "first planted rank": e["first_planted_rank"],
                         "AUROC": e["auroc"], "token AUROC": e.get("token_auroc"), "planted items": e["n_planted"],
                         "items": e["n_items"]})
    df = pd.DataFrame(rows)
    fmt = {c: (lambda v: fmt_num(v, 2)) for c in ("precision@10", "precision@50")}
    fmt["first planted rank"] = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt_num(v, 1)
    return tables.add("summary", df, fmt=fmt)


def _factor_table(summary: dict, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for case, methods in summary["organisms"].items():
        for m, e in methods.items():
            row = {"organism": case, "method": m}
            for f, v in e["at_factor"].items():
                row[f"p@10 ({f}x)"] = v["precision_at_10"]
                row[f"first rank ({f}x)"] = v["first_planted_rank"]
                row[f"planted ({f}x)"] = v["n_planted"]
            rows.append(row)
    return tables.add("by_factor", pd.DataFrame(rows))


def _estimator_table(result: dict, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for case, cr in result["cases"].items():
        for est, e in cr.estimators.items():
            rows.append({"organism": case, "estimator": est, "precision@10": e["precision_at_10"],
                         "first planted rank": e["first_planted_rank"], "AUROC": e["auroc"]})
    if not rows:
        return []
    df = pd.DataFrame(rows).pivot_table(index="estimator", columns="organism",
                                        values=["precision@10", "first planted rank"], sort=False)
    df.columns = [f"{org}: {what}" for what, org in df.columns]
    df = df.reset_index()
    return tables.add("map_error_estimators", df)


def _heatmap(summary: dict, path: Path, command: str) -> str:
    plt = agg_pyplot()
    cases = list(summary["organisms"])
    methods = sorted({m for c in cases for m in summary["organisms"][c]})
    grid = np.full((len(methods), len(cases)), np.nan)
    for j, c in enumerate(cases):
        for i, m in enumerate(methods):
            v = summary["organisms"][c].get(m, {}).get("precision_at_10")
            grid[i, j] = np.nan if v is None else v
    fig, ax = plt.subplots(figsize=(1.3 * len(cases) + 3, 0.38 * len(methods) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_yticks(range(len(methods)), methods)
    ax.grid(False)
    for i in range(len(methods)):
        for j in range(len(cases)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="w" if grid[i, j] < 0.5 else "k")
    fig.colorbar(im, ax=ax, label="precision@10")
    ax.set_title(f"precision@10 (planted: {DEFAULT_FACTOR:g}x mass share)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, command)
    return f"![precision at 10](figures/{path.name})"


def _token_error_figure(result: dict, path: Path, command: str) -> str:
    plt = agg_pyplot()
    cases = [c for c in result["cases"]]
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.0), squeeze=False)
    for ax, c in zip(axes[0], cases):
        te = result["cases"][c].token_error_planted
        lo = 1e-3
        bins = np.logspace(-3, 3, 49)
        for key, color in (("ordinary", "0.55"), ("planted", "#d62728")):
            v = np.maximum(np.asarray(te[key]), lo)
            if len(v):
                ax.hist(v, bins=bins, density=True, histtype="step", color=color, linewidth=1.5,
                        label=f"{key} ({len(v):,})")
        ax.set_xscale("log")
        ax.set(title=c, xlabel="map error e_B(t) / mean")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path, command)
    return f"![token error](figures/{path.name})"


def write_organisms_report(result: dict, out: str | Path) -> tuple[Path, dict]:
    """Write report.md, figures/, tables/ and summary.json under ``out``; return (report path, summary)."""
    out = Path(out)
    cfg = result["config"]
    command = command_line(cfg)
    tables = Tables(out, command)
    figs = out / "figures"
    summary = summary_json(result)
    atomic_write_json(out / "summary.json", summary)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    size = "quick mode (small sizes: a check that it runs, not numbers to quote)" if cfg.quick else "default size"
    lines = [f"<!-- Generated by: {command} -->", f"Generated by `{command}` ({size}, {when}, "
             f"{result['seconds']:.0f} s on {cfg.threads} torch threads).", "",
             "# Model organisms: every method against a known, planted change", "", *_finding(summary, result)]
    lines += ["## Targets", "",
              "From the issue: on `backdoor` and `facts` a planted item at rank ≤ 5, precision@10 ≥ 0.5 and the "
              "planted tokens found with AUROC ≥ 0.95; on every control (`null`, `null_facts`, `sae_seed`) "
              "precision@10 ≤ 0.1. Methods without a per-token score cannot meet the token target.", "",
              *_targets_table(summary, tables)]
    ct = summary["calibration_targets"]
    fdr = next((c["fdr"] for c in summary.get("calibrated", {}).values() if c.get("fdr") is not None), 0.1)
    lines += [f"## Calibrated calls at FDR {100 * fdr:g}%", "",
              "align's verdict (`diffkit.calibrate`): a feature is called A-only / B-only (retention under the "
              "matched-pair null) or changed (act-mass ratio, or the map's error where it fires, each under a "
              "model-free empirical null), Benjamini–Hochberg at the FDR. Targets: on every control at most "
              f"{100 * CALL_SHARE_MAX:g}% of the live features called; on backdoor and facts, planted features among "
              "the calls. " + ("**Met.**" if ct["meets_all"] else "**Not met**: " + "; ".join(
                  [k for k, v in ct["checks"].items() if not v] + [f"{m} did not run" for m in ct["missing"]]) + "."),
              "", *_calibrated_table(summary, tables)]
    lines += ["## Every organism, every method", "",
              f"Planted item: a feature (B's SAE) or crosscoder latent whose share of activation mass on one planted "
              f"label is at least {DEFAULT_FACTOR:g}× that label's share of the store (odds form, see *Definitions*).",
              "", _heatmap(summary, figs / "precision_at_10.png", command), "", *_summary_table(summary, tables),
              "### Sensitivity to the planted threshold (10×, 20×, 50×)", "", *_factor_table(summary, tables)]
    lines += ["## Choosing the map-error estimator", "",
              "The per-feature score from the same streamed sums under other estimators: activation-weighted "
              "(`(Σ f e + c ē)/(Σ f + c)/ē`) or over firing tokens only (`(Σ_fire e + c ē)/(#fire + c)/ē`), with a "
              "prior of c typical firings (weighted: c × the median mass of one firing). The default "
              f"(`diffkit.divergence.PRIOR_FIRINGS`) is weighted with c = {PRIOR:g}, chosen on this table.", "",
              *_estimator_table(result, tables)]
    lines += ["## The tokens where the map fails", "",
              "Per-token error of the A→B map over its mean, planted tokens against ordinary ones (a sample of "
              "20,000).", "", _token_error_figure(result, figs / "token_error.png", command), ""]
    for name, cr in result["cases"].items():
        lines += [f"### {name}: {CASES[name].model_a} vs {CASES[name].model_b} ({CASES[name].what})", "",
                  f"{cr.n_tokens:,} tokens of `{CASES[name].corpus}`; labels: " +
                  ", ".join(f"{k} {100 * v:.2f}%" for k, v in cr.label_rates.items()) +
                  f"; map held-out FVE A→B {fmt_num(cr.map_fve.get('a_to_b'))}. Planted items (20×): " +
                  ", ".join(f"{k} {v['20']}" for k, v in cr.planted_counts.items()) + ".", ""]
        w = cr.worst.head(10)
        cols = ["rank", "error_ab_rel", "position"] + (["label"] if "label" in w else [])
        df = w[cols].copy()
        if "label" in df:
            df["label"] = [cr.label_names[int(v)] if int(v) < len(cr.label_names) else str(v) for v in df.label]
        df["context"] = w.context.to_numpy()
        lines += ["Worst-mapped tokens (the token in bold):", "",
                  *tables.add(f"{name}_worst_tokens", df, cells={"context": [md_context(c) for c in df.context]})]
        top = cr.top_map_error[["feature", "map_err", "freq", "diff_cos", "planted", "context"]].copy()
        lines += ["B's features by map error (*planted* by the answer key; context: its firing among the worst tokens):",
                  "", *tables.add(f"{name}_top_features", top, cells={"context": [md_context(c) if c else "–"
                                                                                  for c in top.context]})]
        promo = cr.promoted
        if promo and "overall" in promo:
            ups = {k: " ".join(repr(t["token"]) for t in v["up"][:10]) for k, v in promo.items() if k != "note"}
            lines += ["Mean activation difference through B's unembedding, tokens it promotes most: " +
                      "; ".join(f"{k}: {v}" for k, v in ups.items()), ""]
        for arch, info in cr.crosscoder.items():
            lines += [f"Crosscoder {arch}: held-out FVE {fmt_num(info['fve_a'])} / {fmt_num(info['fve_b'])}; labels "
                      f"{info['counts']}; planted latents' labels {info['planted_labels'] or '–'}, their r "
                      f"{', '.join(f'{v:.2f}' for v in info['planted_r'][:5]) or '–'}.", ""]
    if result["missing"]:
        lines += ["## Missing", "", *[f"- `{k}`: {v}" for k, v in result["missing"].items()], ""]
    lines += ["## Definitions", "",
              "- **Methods.** `align b-only`: B's unmatched features by activation mass (align's default list); "
              "`align RANKING`: the shared pairs by that ranking's |score| (item: the pair's B feature), the "
              "unmatched unlisted; `map-error`: every B feature by `map_err` (the FeatureDiff column, "
              "`diffkit align --rank-by map-error`); `activation-difference`: by cos(mean(x_B − x_A), decoder row); "
              "`activation-difference-along`: by the activation-weighted mean of ⟨x_B − x_A, d̂_i⟩ where the feature "
              "fires; `crosscoder ARCH`: latents by r = ‖d_B‖/(‖d_A‖+‖d_B‖) (dead latents unlisted). Formulas in "
              "`diffkit.divergence`.",
              f"- **Planted** (item i, label l of share ρ_l, item's mass share s on l): s/(1−s) ≥ f·ρ_l/(1−ρ_l), f = "
              f"{DEFAULT_FACTOR:g} (e.g. ρ = 0.1% needs s ≥ {share_threshold(0.001):.3f}, ρ = 2% needs "
              f"s ≥ {share_threshold(0.02):.3f}); = s ≥ f·ρ for rare labels.",
              "- **precision@k**: expected planted fraction of the top k, ties broken at random; **first planted "
              "rank**: expected rank of the best planted item (same tie rule); unlisted and NaN items tie at the bottom.",
              "- **AUROC**: planted vs not items under the method's score; **token AUROC**: planted (label > 0) vs "
              "ordinary tokens under the method's per-token score (map error e_B; ‖x_B − x_A‖² for the activation "
              "difference).", ""]
    report = out / "report.md"
    atomic_write_bytes(report, ("\n".join(lines).rstrip() + "\n").encode())
    return report, summary


def format_organisms_summary(summary: dict) -> str:
    lines = []
    for case, methods in summary["organisms"].items():
        for m in ("map-error", "align b-only", "activation-difference", "crosscoder batchtopk"):
            e = methods.get(m)
            if e:
                lines.append(f"{case:<11} {m:<24} p@10 {fmt_num(e['precision_at_10'], 2)}  first "
                             f"{rank_text(e['first_planted_rank']):<8} token AUROC {fmt_num(e.get('token_auroc'))}")
    best = best_method(summary)
    if best:
        lines.append(f"best training-free method: {best} ({summary['targets'][best]['n_met']}/"
                     f"{summary['targets'][best]['n_checks']} targets)")
    return "\n".join(lines)
