"""The sections of a comparison report: each returns markdown lines and writes its tables' CSVs.

``runs`` is a list of :class:`diffkit.report.RunData`, the main comparison first; ``tables`` a
:class:`diffkit.report.markdown.Tables` that writes ``tables/NAME.csv`` and names the command.
"""

from __future__ import annotations

from typing import Any

from .markdown import Tables, escape, fmt_num, human, md_context

SIDE = {"a": "A", "b": "B"}


def _pair(x: Any, y: Any, digits: int = 3) -> str:
    return f"{fmt_num(x, digits)} / {fmt_num(y, digits)}"


def _code(x: Any) -> str:
    return f"`{x}`"


def headline(runs: list, tables: Tables) -> tuple[list[str], Any]:
    """The head-to-head table: one row per run."""
    import pandas as pd

    rows = []
    for run in runs:
        s = run.summary
        c, cc, ag, rec = s["align"]["counts"], s["analysis"]["counts"], s["agreement"], s["reconstruction"]
        live = sum(v for k, v in cc.items() if k != "dead")
        tot = s["cost"]["total"]
        rows.append({"run": run.label, "pair": run.what,
                     "align shared / A-only / B-only": f"{c['shared']:,} / {c['a_only']:,} / {c['b_only']:,}",
                     "crosscoder A-only / B-only (of live)": f"{cc['A-only']:,} / {cc['B-only']:,} ({live:,})",
                     **_calibrated_counts(s),
                     "exclusivity ρ A / B": _pair(ag["a"]["spearman_excl"], ag["b"]["spearman_excl"], 2),
                     "FVE SAEs A / B": _pair(rec["sae"]["a"]["fve"], rec["sae"]["b"]["fve"]),
                     "FVE crosscoder A / B": _pair(rec["crosscoder"]["fve_a"], rec["crosscoder"]["fve_b"]),
                     "wall s align / crosscoder": _pair(tot["align"]["seconds"], tot["crosscoder"]["seconds"], 1)})
    df = pd.DataFrame(rows)
    intro = ["*align*: SAE features unmatched at the similarity threshold are A-only / B-only. *crosscoder*: live",
             "latents with r ≤ 0.1 / r ≥ 0.9. *at FDR*: the calls of each that survive the nulls of",
             "`diffkit.calibrate` (exclusive: retention of the feature's activation in the other model's residual;",
             "changed: the act-mass ratio of a pair, or the map's error where the feature fires; BH q ≤ the FDR).",
             "*exclusivity ρ*: Spearman correlation of the two methods' exclusivity",
             "scores on the SAE features both can see. FVE on the store's held-out tokens, one formula for all.",
             "Wall time end to end from the same store (map fit + alignment; crosscoder training + analysis).", ""]
    return intro + tables.add("headline", df), df


def _calibrated_counts(s: dict) -> dict:
    """Headline cells: calls at the FDR of both methods (absent for runs made before calibration)."""
    out = {}
    cal, ccal = s["align"].get("calibration"), s["analysis"].get("calibration")
    if cal:
        c = cal["calls"]
        out[f"align at FDR {100 * cal['fdr']:g}%: A-only / B-only / changed"] = (
            f"{c['a_only']:,} / {c['b_only']:,} (of {c['unmatched_a']:,} / {c['unmatched_b']:,}) / {c['changed']:,}")
    if ccal:
        out[f"crosscoder at FDR {100 * ccal['fdr']:g}%: A-only / B-only"] = (
            f"{ccal['calls']['A-only']:,} / {ccal['calls']['B-only']:,}")
    return out


def compared(runs: list, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for run in runs:
        s = run.summary
        st, tr = s["store"], s["crosscoder"]["train"]
        rows.append({"run": run.label, "model A": st["model_a"], "model B": st["model_b"],
                     "hooks": st["hook_a"] if st["hook_a"] == st["hook_b"] else f"{st['hook_a']} / {st['hook_b']}",
                     "d A / B": f"{st['d_a']} / {st['d_b']}", "tokens (train / held-out)":
                     f"{st['tokens']['all']:,} ({st['tokens']['train']:,} / {st['tokens']['heldout']:,})",
                     "SAE A": s["saes"]["a"]["describe"], "SAE B": s["saes"]["b"]["describe"],
                     "crosscoder": f"{s['crosscoder']['arch']}, L = {s['crosscoder']['dict_size']:,}, k = "
                                   f"{s['crosscoder']['k']}, {fmt_num(tr.get('tokens'))} training tokens"})
    df = pd.DataFrame(rows)
    return tables.add("compared", df, fmt={"model A": _code, "model B": _code, "hooks": _code})


def alignment(runs: list, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for run in runs:
        a = run.summary["align"]
        m = a["map"]["scores"]
        rows.append({"run": run.label, "map FVE A→B": m["a_to_b"]["heldout_fve"], "map FVE B→A": m["b_to_a"]["heldout_fve"],
                     "threshold": a["threshold"], "shared": a["counts"]["shared"], "A-only": a["counts"]["a_only"],
                     "B-only": a["counts"]["b_only"], "median similarity": a["similarity_quantiles"]["0.5"],
                     "tokens for statistics": a["tokens"]})
    return tables.add("alignment", pd.DataFrame(rows), fmt={"threshold": lambda v: f"{v:g}"})


def top_features(run: Any, tables: Tables, n: int = 5) -> list[str]:
    """The FeatureDiff's top unmatched features each way, with contexts and their crosscoder partner."""
    import pandas as pd

    lines = []
    for side in ("a", "b"):
        t = run.align_table
        only = t[t.kind == f"{side}_only"]
        calibrated = "verdict" in only
        if calibrated:  # the calls at the FDR first, most significant first; then the rest by activation mass
            only = only.assign(_c=only.verdict != f"{side}_only").sort_values(["_c", "q_exclusive"], kind="stable")
        only = only.head(n)
        b = run.bridge[run.bridge.side == side].set_index("feature")
        rows, md_cells = [], []
        for _, r in only.iterrows():
            i = int(r[f"feature_{side}"])
            lat = int(b.latent.get(i, -1))
            ctx = run.align_contexts.get((side, i), [])
            rows.append({"feature": f"{SIDE[side]}#{i}", "freq": r[f"freq_{side}"], "mean act": r[f"mean_act_{side}"],
                         "best partner sim": r.similarity,
                         **({"retention": r.retention, "q": r.q_exclusive, "verdict": r.verdict} if calibrated else {}),
                         "crosscoder latent (r)": f"#{lat} ({b.cc_r[i]:.2f})" if lat >= 0 else "none",
                         "top contexts": " · ".join(ctx[:3])})
            md_cells.append(" · ".join(md_context(c) for c in ctx[:3]) or "(never fired)")
        model = run.summary["store"][f"model_{side}"]
        order = "calls at the FDR first, by q; then by activation mass" if calibrated else "by activation mass"
        lines += [f"### Top {SIDE[side]}-only features ({escape(str(model))}, {order})", ""]
        if not rows:
            lines += ["None at this threshold.", ""]
            continue
        lines += tables.add(f"top_{side}_only", pd.DataFrame(rows), cells={"top contexts": md_cells},
                            fmt={"freq": lambda v: f"{v:.4f}", "mean act": lambda v: f"{v:.4f}",
                                 "best partner sim": lambda v: fmt_num(v, 2), "retention": lambda v: fmt_num(v, 2),
                                 "q": lambda v: fmt_num(v, 3)})
    return lines


def crosscoder(runs: list, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for run in runs:
        s = run.summary
        a, tr = s["analysis"], s["crosscoder"]["train"]
        rows.append({"run": run.label, "latents": s["crosscoder"]["dict_size"], "train tokens": tr.get("tokens"),
                     "train s": tr.get("seconds"), "FVE A": a["fve_a"], "FVE B": a["fve_b"], "L0": a["l0"],
                     "dead %": 100 * a["dead_frac"], **{lab: a["counts"][lab] for lab in
                                                       ("A-only", "B-only", "shared", "intermediate")},
                     "sharedness": a["sharedness"]})
    return tables.add("crosscoder", pd.DataFrame(rows), fmt={"train s": lambda v: fmt_num(v, 1),
                                                             "L0": lambda v: fmt_num(v, 1),
                                                             "dead %": lambda v: fmt_num(v, 1)})


def agreement(runs: list, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for run in runs:
        ag = run.summary["agreement"]
        for side in ("a", "b"):
            g = ag[side]
            rows.append({"run": run.label, "SAE": SIDE[side], "bridged / features": f"{g['bridged']:,} / {g['features']:,}",
                         "median bridge cos": g["bridge_cos_median"], "align flags": g["align_flags_bridged"],
                         "crosscoder flags": g["cc_flags_bridged"], "both": g["both"],
                         "precision": g["precision"], "recall": g["recall"], "Spearman ρ": g["spearman_excl"],
                         "P@k, k = align flags (chance)": f"{fmt_num(g['precision_at_flags'], 2)} "
                                                          f"({fmt_num(g['chance_at_flags'], 2)})"})
    lines = tables.add("agreement", pd.DataFrame(rows))
    prow = []
    for run in runs:
        p = run.summary["agreement"]["pairs"]
        prow.append({"run": run.label, "align shared pairs": p["shared"], "both features bridged": p["both_bridged"],
                     "on one latent (consistent)": p["consistent"], "consistent %": 100 * (p["consistent_frac"] or 0),
                     "strength Spearman ρ": p["spearman_strength"]})
    lines += ["Do the two methods' *shared* features coincide? A pair the FeatureDiff calls shared is consistent",
              "when both of its features are bridged to the same crosscoder latent:", ""]
    lines += tables.add("pairs", pd.DataFrame(prow), fmt={"consistent %": lambda v: fmt_num(v, 1)})
    return lines


def disagreements(run: Any, tables: Tables) -> list[str]:
    """Features one method flags as exclusive and the other does not (main run), with contexts."""
    import pandas as pd

    s = run.summary
    rows, md_cells = [], []
    for side in ("a", "b"):
        b = run.bridge[run.bridge.side == side].set_index("feature")
        for who in ("align_only", "cc_only"):
            for i in s["listed"][side][who]:
                r = b.loc[i]
                rows.append({"SAE feature": f"{SIDE[side]}#{i}",
                             "flagged by": "align only" if who == "align_only" else "crosscoder only",
                             "align verdict (sim)": f"{r.align_kind} ({fmt_num(1 - r.align_excl, 2)})",
                             **({"align q": fmt_num(r.align_q, 3), "crosscoder q": fmt_num(r.cc_q, 3)}
                                if "align_q" in r else {}),
                             "crosscoder latent (label, r)": f"#{int(r.latent)} ({r.cc_label}, {r.cc_r:.2f})",
                             "bridge cos": r.bridge_cos,
                             "top contexts": " · ".join(s["contexts"][side].get(str(i), [])[:3])})
                md_cells.append(" · ".join(md_context(c) for c in s["contexts"][side].get(str(i), [])[:3])
                                or "(never fired)")
    intro = [f"Listed: up to {s['config']['top']} per side and method, among SAE features with a bridge partner; "
             "align-only flags whose latent the crosscoder calls most shared first, crosscoder-only flags whose "
             "latent is most exclusive first.", ""]
    if not rows:
        return intro + ["None: on every bridged feature the two methods agree on exclusivity (or neither flags any).",
                        ""]
    return intro + tables.add("disagreements", pd.DataFrame(rows), cells={"top contexts": md_cells},
                              fmt={"bridge cos": lambda v: fmt_num(v, 2)})


def reconstruction(runs: list, tables: Tables) -> list[str]:
    import pandas as pd

    rows = []
    for run in runs:
        rec = run.summary["reconstruction"]
        rows.append({"run": run.label, "SAE A on x_A": rec["sae"]["a"]["fve"], "SAE B on x_B": rec["sae"]["b"]["fve"],
                     "map A→B": rec["map"]["a_to_b"], "map B→A": rec["map"]["b_to_a"],
                     "crosscoder on x_A": rec["crosscoder"]["fve_a"], "crosscoder on x_B": rec["crosscoder"]["fve_b"],
                     "L0 SAE A / B": _pair(rec["sae"]["a"]["l0"], rec["sae"]["b"]["l0"], 1),
                     "L0 crosscoder": rec["crosscoder"]["l0"], "tokens": rec["crosscoder"]["tokens"]})
    return tables.add("reconstruction", pd.DataFrame(rows), fmt={"L0 crosscoder": lambda v: fmt_num(v, 1)})


def cost(runs: list, tables: Tables) -> list[str]:
    import pandas as pd

    names = {"map_fit": ("align", "fit the linear map (moments pass)"),
             "align": ("align", "assignment + statistics pass"),
             "crosscoder_train": ("crosscoder", "training (incl. final held-out evaluation)"),
             "crosscoder_analyze": ("crosscoder", "analysis (one forward pass)")}
    rows = []
    for run in runs:
        c = run.summary["cost"]
        for key, (method, what) in names.items():
            st = c["stages"][key]
            rows.append({"run": run.label, "method": method, "stage": what, "tokens": st["tokens"],
                         "wall s": st["seconds"], "FLOPs": st["flops"]})
        for method in ("align", "crosscoder"):
            t = c["total"][method]
            rows.append({"run": run.label, "method": method, "stage": "total", "tokens": None,
                         "wall s": t["seconds"], "FLOPs": t["flops"]})
    df = pd.DataFrame(rows)
    return tables.add("cost", df, fmt={"wall s": lambda v: fmt_num(v, 1), "FLOPs": lambda v: human(v),
                                       "tokens": lambda v: "" if v is None or v != v else f"{int(v):,}",
                                       "stage": lambda v: "**total**" if v == "total" else v})


def caveats(runs: list) -> list[str]:
    """What the numbers warrant, computed from them (noise floors, undefined scores, coverage)."""
    main = runs[0]
    s = main.summary
    out = []
    floor = next((r for r in runs if r.role == "sae-seed"), None)
    c = s["align"]["counts"]
    if floor is not None:
        f = floor.summary["align"]["counts"]
        excess = c["a_only"] - f["a_only"]
        verdict = ("within SAE-training noise: the diff's unmatched features are not, by count, evidence of a model "
                   "difference" if excess <= 0.5 * f["a_only"] else "above SAE-training noise")
        out.append(f"- **Noise floor of the training-free diff.** Two SAEs of the *same* model ({floor.label}) leave "
                   f"{f['a_only']:,} A-only / {f['b_only']:,} B-only at the same threshold; {main.label} leaves "
                   f"{c['a_only']:,} / {c['b_only']:,}. The excess ({excess:+,} on A) is {verdict}. Paulo & Belrose "
                   "(2025) report 30–53% of latents shared between SAE seeds; read every unmatched count against "
                   "this row.")
        cal, fcal = s["align"].get("calibration"), floor.summary["align"].get("calibration")
        if cal and fcal:
            out.append(f"- **Calibrated.** At FDR {100 * cal['fdr']:g}% the diff calls {cal['calls']['a_only']:,} A-only "
                       f"/ {cal['calls']['b_only']:,} B-only ({main.label}) and {fcal['calls']['a_only']:,} / "
                       f"{fcal['calls']['b_only']:,} on the SAE-seed floor; null: {cal['null_exclusive']}.")
        fc = floor.summary["analysis"]["counts"]
        out.append(f"- **Noise floor of the crosscoder.** On the identical-model store it labels {fc['A-only']:,} "
                   f"A-only and {fc['B-only']:,} B-only latents ({main.label}: {s['analysis']['counts']['A-only']:,} / "
                   f"{s['analysis']['counts']['B-only']:,}).")
    for run in runs:
        k = run.summary["align"]["counts"]
        if run.role == "model-seed" and k["shared"] < c["shared"]:
            out.append(f"- **A separately trained model is not a noise floor.** {run.label} ({run.what}) shares "
                       f"{k['shared']:,} SAE features, fewer than {main.label} ({c['shared']:,}): two seeds of one "
                       "recipe differ more than this pair does, so it bounds nothing from below.")
    for side in ("a", "b"):
        g = s["agreement"][side]
        if g["cc_flags_bridged"] == 0 or g["align_flags_bridged"] == 0:
            who = "the crosscoder" if g["cc_flags_bridged"] == 0 else "the training-free diff"
            out.append(f"- **Side {SIDE[side]}: {who} flags no bridged feature as exclusive**, so precision and "
                       "recall say nothing there (one is n/a, the other 0 or n/a by construction); the rank "
                       "correlation and precision@k compare the two methods' continuous scores instead.")
        frac = g["bridged"] / max(g["features"], 1)
        if frac < 0.8:
            out.append(f"- **Coverage, side {SIDE[side]}:** only {g['bridged']:,} of {g['features']:,} SAE features "
                       f"({100 * frac:.0f}%) have a crosscoder latent at bridge cosine ≥ "
                       f"{s['config']['bridge_threshold']:g}; the agreement scores speak for those only.")
    held = s["store"]["tokens"]["heldout"]
    if held < 10 * (s["store"]["d_a"] + s["store"]["d_b"]):
        out.append(f"- **Few held-out tokens ({held:,}):** FVE and the crosscoder's labels (a latent that never fires "
                   "on them is counted dead) are noisy at this size.")
    dead = s["analysis"]["dead_frac"]
    if dead > 0.2:
        out.append(f"- **{100 * dead:.0f}% of the crosscoder's latents never fired on the analysed tokens**; they are "
                   "left out of the bridge and of the label counts.")
    out.append("- **Cost:** the training-free diff takes its SAEs as given (their training is not counted); times are "
               "wall-clock on this machine, FLOPs are analytic counts (formulas below), dense-equivalent for the "
               "crosscoder.")
    return out + [""]


def definitions(runs: list) -> list[str]:
    s = runs[0].summary
    f, fl = s["formulas"], s["cost"]["formulas"]
    a = s["analysis"]["thresholds"]
    return [
        "- **FVE** (fraction of variance explained, every FVE in this report): " + escape(f["fve"]) + ".",
        "- **similarity** (training-free diff): cosine of A's SAE decoder direction carried through the linear part of "
        f"the A→B map with its assigned B direction; assignment one-to-one (Hungarian); pairs below "
        f"{s['align']['threshold']:g} are unmatched (A-only / B-only).",
        "- **activation-mass log ratio** (the strength difference of a shared pair; align's default ranking): "
        "log((m_A + ε) / (m_B + ε)) minus its median over the shared pairs, m = mean activation × decoder-row norm.",
        "- **robust encoder-norm difference**: ‖e_A‖ / median_A − ‖e_B‖ / median_B of a shared pair's effective encoder "
        "norms, each SAE over its own median.",
        "- **relative norm** r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖) of a crosscoder latent's two decoder blocks; labels: "
        f"A-only {a['A-only']}, B-only {a['B-only']}, shared {a['shared']}, otherwise intermediate; dead = never fired.",
        "- **sharedness** Σ w (1 − |2r − 1|) / Σ w over live latents, w = mean activation × (‖d_A‖ + ‖d_B‖); "
        "**L0** mean active latents per token.",
        "- **bridge**: " + escape(f["bridge"]) + f" (threshold {s['config']['bridge_threshold']:g}).",
        "- **align exclusivity**: " + escape(f["align_excl"]) + "; **crosscoder exclusivity**: " + escape(f["cc_excl"]) + ".",
        "- **precision** " + escape(f["precision"]) + "; **recall** " + escape(f["recall"]) + ".",
        "- **Spearman ρ**: " + escape(f["spearman_excl"]) + "; **strength ρ**: " + escape(f["spearman_strength"]) + ".",
        "- **precision@k**: " + escape(f["precision_at_k"]) + ".",
        "- **FLOPs**: map fit " + escape(fl["map_fit"]) + "; alignment " + escape(fl["align"]) + "; crosscoder "
        "training " + escape(fl["crosscoder_train"]) + "; analysis " + escape(fl["crosscoder_analyze"]) + ". N: tokens, "
        "d: widths, n: SAE features, L: crosscoder latents.",
        "",
    ]


def crosscoder_top(run: Any, tables: Tables) -> list[str]:
    """The crosscoder's own top exclusive latents with their contexts (from its analysis), when it has any."""
    import pandas as pd

    lines = []
    for lab in ("A-only", "B-only"):
        top = run.cc_top.get(lab, [])
        rows = [{"latent": f"#{t['latent']}", "freq": t["freq"], "r": t["rel_norm_r_b"],
                 **({"q": fmt_num(t["q_exclusive"], 3)} if "q_exclusive" in t else {}),
                 "top contexts": " · ".join(c["text"] for c in t["contexts"][:3])} for t in top]
        md_cells = [" · ".join(md_context(c["text"]) for c in t["contexts"][:3]) for t in top]
        if rows:
            lines += [f"Top {lab} latents of the crosscoder (by frequency):", ""]
            lines += tables.add(f"crosscoder_top_{lab[0].lower()}_only", pd.DataFrame(rows),
                                cells={"top contexts": md_cells}, fmt={"freq": lambda v: f"{v:.4f}"})
    return lines
