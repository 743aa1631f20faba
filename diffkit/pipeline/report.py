"""The pipeline's report: the project's head-to-head report (:mod:`diffkit.report`) with a preamble
saying which models, stores and controls it read, and a footer with each stage's wall time."""

from __future__ import annotations

import platform
from pathlib import Path

from .stages import RUN_ROLES, Context, given_sources, model_b, pairs, run_dir, run_what, runs

RUN_TEXT = {"diff": "{a} vs {b} with their own SAEs",
            "sae-seed control": "{what} (the crosscoder sees two identical models): the noise floor of both methods",
            "model-seed pair": "{a} vs {seed}, another network from the same recipe"}


def stage_frame(stage_s: dict, total: float):
    """The wall-time table: one row per stage, then the total."""
    import pandas as pd

    return pd.DataFrame([{"stage": k, "wall s": v} for k, v in stage_s.items()] +
                        [{"stage": "total before the report", "wall s": total}])


STORE_COLUMNS = ("store", "model A", "model B", "tokens", "train", "held-out", "scale A", "scale B", "tokens/s")


def preamble(ctx: Context, tables) -> list[str]:
    import pandas as pd

    from ..report.markdown import fmt_num

    cfg, lines = ctx.cfg, ["## The models", ""]
    if cfg.report.intro:
        lines += [cfg.report.intro.strip(), ""]
    if "losses" in ctx.results:
        r = ctx.results["losses"]
        lines += [f"Held-out next-token loss (nats/token, {r['sequences']} sequences of ctx {r['ctx']} per domain):", ""]
        # Column order by name: a stage result read back from its marker has its keys sorted.
        lines += tables.add("models", pd.DataFrame(r["rows"])[["model", "prose", "code"]],
                            fmt={"model": lambda v: f"`{v}`"})
    d = cfg.data
    stores = pd.DataFrame(ctx.results["collect"]["stores"])[list(STORE_COLUMNS)]
    if d.store:
        src = given_sources(cfg)
        where = f"given: `{d.store}`, not collected here; hook `{src['a']['hook']}` / `{src['b']['hook']}`"
    else:
        hooks = f"`{d.hook}`" + (f" / `{d.hook_b}`" if d.hook_b and d.hook_b != d.hook else "")
        where = f"hook {hooks}, corpus `{d.corpus}`, ctx {d.ctx}"
    lines += [f"Activation stores ({where}). Scale = sqrt(d_model) / mean ‖x‖ over train tokens, BOS and padding "
              "excluded; applied on read.", ""]
    lines += tables.add("stores", stores, fmt={"model A": lambda v: f"`{v}`", "model B": lambda v: f"`{v}`",
                                               "tokens/s": lambda v: f"{v:,.0f}" if v == v else "–"})
    names = {"a": pairs(cfg)[0][1].removeprefix("zoo:"), "b": run_what(cfg, "diff").split(" vs ", 1)[1],
             "seed": cfg.controls.model_seed.removeprefix("zoo:")}
    text = "; ".join(f"**{run}** = " + RUN_TEXT[run].format(**names, what=run_what(cfg, run)) for run in runs(cfg))
    lines += [f"Runs: {text}. {fmt_num(len(pairs(cfg)))} stores, one crosscoder per store.", ""]
    return lines


HEADLINE_METHODS = ("map-error", "align b-only", "align act-mass", "align enc-norm", "activation-difference",
                    "activation-difference-along", "crosscoder batchtopk")


def finding(ctx: Context, tables) -> list[str]:
    """The found answer, first in the report: where each method ranks B's first planted feature on the
    diff, and its precision@10 on the controls (where every hit is a false positive); align's calibrated calls."""
    import pandas as pd

    from ..bench.organisms_report import rank_text
    from ..report.markdown import fmt_num

    answer = ctx.results.get("answer", {}).get("runs", {})
    if "diff" not in answer:
        return []
    main, controls = answer["diff"], [r for r in answer if r != "diff"]
    m = main["metrics"]
    n_planted = main["planted_counts"]["sae_b"]["20"]
    shown = [k for k in HEADLINE_METHODS if k in m]
    best = min(shown, key=lambda k: (m[k]["first_planted_rank"] is None, m[k]["first_planted_rank"] or 0))
    rates = ", ".join(f"{k} {100 * v:.2f}%" for k, v in main["label_rates"].items())
    b = model_b(ctx.cfg)  # a zoo name, a directory, or the fine-tune's directory
    parts = [f"{rank_text(m[k]['first_planted_rank'])} by {k}" for k in shown
             if k in ("map-error", "align b-only", "crosscoder batchtopk", "activation-difference")]
    found = m[best]["first_planted_rank"] is not None and m[best]["first_planted_rank"] <= 10
    head = "The planted change is found." if found else "No method ranks a planted feature in its top 10."
    text = [f"**{head}** `{ctx.cfg.data.corpus}` marks the tokens where `{b}` was changed ({rates} of the "
            f"store); {n_planted} of B's SAE features put ≥ 20× their share of activation mass there (*planted*). "
            f"B's first planted feature is " + ", ".join(parts) + f" (best: **{best}**, "
            f"{rank_text(m[best]['first_planted_rank'])}, precision@10 {fmt_num(m[best]['precision_at_10'], 2)})."]
    beh = ctx.results.get("answer", {}).get("behaviour") or {}
    a, bb = beh.get("a"), beh.get("b")
    if beh.get("organism") == "backdoor":
        text.append(f"B learned it: after the trigger on held-out prose its greedy continuation is the response "
                    f"{100 * bb['response_exact']:.0f}% of the time (A {100 * a['response_exact']:.0f}%; response "
                    f"tokens right {100 * bb['response_token_acc']:.0f}% vs {100 * a['response_token_acc']:.0f}%, "
                    f"{bb['n_prompts']} prompts), and {100 * bb['no_trigger_exact']:.0f}% without the trigger.")
    elif beh.get("organism") == "facts":
        text.append(f"B learned it: it recalls the place {100 * bb['place_exact']:.0f}% of the time on held-out "
                    f"prose (A {100 * a['place_exact']:.0f}%).")
    cal = main.get("calibrated") or {}
    if cal:
        ctrl = [f"{r} {answer[r]['calibrated']['called_features']} ({100 * answer[r]['calibrated']['called_share_of_live']:.1f}%)"
                for r in controls if answer[r].get("calibrated")]
        text.append(f"At FDR {100 * cal['fdr']:g}% align calls {cal['called_features']} of {cal['live_features']} "
                    f"live features ({cal['changed_by_map_error']} changed where the map fails), "
                    f"{cal['planted_b_called']} of the {cal['planted_b']} planted among them"
                    + ("; the same calls on the controls: " + ", ".join(ctrl) if ctrl else "") + ".")
    lines = [" ".join(text), ""]
    rows = []
    for k in shown:
        row = {"method": k, "first planted rank": m[k]["first_planted_rank"], "precision@10": m[k]["precision_at_10"],
               "token AUROC": m[k].get("token_auroc")}
        for r in controls:
            row[f"{r}: precision@10"] = answer[r]["metrics"].get(k, {}).get("precision_at_10")
        rows.append(row)
    fmt = {c: (lambda v: fmt_num(v, 2)) for c in rows[0] if "precision" in c}
    fmt["first planted rank"] = lambda v: "–" if v is None else fmt_num(v, 0 if float(v).is_integer() else 1)
    lines += ["Each method's list of B's features (“B has it, A does not / changed”) against the answer key; on "
              "the controls every planted hit is a false positive (formulas: `diffkit bench organisms`, "
              "[reports/organisms](../organisms/report.md)).", "",
              *tables.add("answer_key", pd.DataFrame(rows), fmt=fmt)]
    return lines


def footer(ctx: Context, tables) -> list[str]:
    import torch

    from .. import __version__

    stage_s = {name: r["seconds"] for name, r in ctx.results.items() if name != "report"}
    lines = ["## How this report was made", "", f"`{ctx.command}` on {platform.machine()}, {torch.get_num_threads()} "
             f"torch threads, device {ctx.cfg.device}, diffkit {__version__}. Large artifacts: `{ctx.work}/` (not "
             "committed); the resolved config: `config.json` there. Wall time per stage (a stage kept from an earlier "
             "invocation keeps its own time; the report itself takes a few seconds more):", ""]
    return lines + tables.add("stages", stage_frame(stage_s, sum(stage_s.values())),
                              fmt={"wall s": lambda v: f"{v:.1f}"})


def write(ctx: Context) -> Path:
    from ..report import load_run, start_report, write_report

    tables = start_report(ctx.out, ctx.command)
    loaded = [load_run(run_dir(ctx.work, "compare", run), label=run, what=run_what(ctx.cfg, run),
                       role=RUN_ROLES[run][3]) for run in runs(ctx.cfg)]
    if ctx.cfg.report.style == "smollm2":
        from .smollm2_report import smollm2_preamble

        pre = smollm2_preamble(ctx, tables)
    else:
        pre = preamble(ctx, tables)
    return write_report(ctx.out, loaded, ctx.command, title=ctx.cfg.report.title, preamble=pre,
                        footer=footer(ctx, tables), tables=tables, finding=finding(ctx, tables))
