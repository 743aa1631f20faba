"""The pipeline's report: the project's head-to-head report (:mod:`diffkit.report`) with a preamble
saying which models, stores and controls it read, and a footer with each stage's wall time."""

from __future__ import annotations

import platform
from pathlib import Path

from .stages import RUN_ROLES, Context, pairs, run_dir, run_what, runs

RUN_TEXT = {"diff": "{a} vs {b} with their own SAEs",
            "sae-seed control": "{what} (the crosscoder sees two identical models): the noise floor of both methods",
            "model-seed pair": "{a} vs {seed}, another network from the same recipe"}


def stage_frame(stage_s: dict, total: float):
    """The wall-time table: one row per stage, then the total."""
    import pandas as pd

    return pd.DataFrame([{"stage": k, "wall s": v} for k, v in stage_s.items()] +
                        [{"stage": "total before the report", "wall s": total}])


def preamble(ctx: Context, tables) -> list[str]:
    import pandas as pd

    from ..report.markdown import fmt_num

    cfg, lines = ctx.cfg, ["## The models", ""]
    if cfg.report.intro:
        lines += [cfg.report.intro.strip(), ""]
    if "losses" in ctx.results:
        r = ctx.results["losses"]
        lines += [f"Held-out next-token loss (nats/token, {r['sequences']} sequences of ctx {r['ctx']} per domain):", ""]
        lines += tables.add("models", pd.DataFrame(r["rows"]), fmt={"model": lambda v: f"`{v}`"})
    d = cfg.data
    stores = pd.DataFrame([{k: v for k, v in row.items() if k not in ("bytes", "massive_dropped")}
                           for row in ctx.results["collect"]["stores"]])
    hooks = f"`{d.hook}`" + (f" / `{d.hook_b}`" if d.hook_b and d.hook_b != d.hook else "")
    lines += [f"Activation stores (hook {hooks}, corpus `{d.corpus}`, ctx {d.ctx}). Scale = sqrt(d_model) / mean ‖x‖ "
              "over train tokens, BOS and padding excluded; applied on read.", ""]
    lines += tables.add("stores", stores, fmt={"model A": lambda v: f"`{v}`", "model B": lambda v: f"`{v}`",
                                               "tokens/s": lambda v: f"{v:,.0f}"})
    names = {"a": cfg.models.a.removeprefix("zoo:"), "b": run_what(cfg, "diff").split(" vs ", 1)[1],
             "seed": cfg.controls.model_seed.removeprefix("zoo:")}
    text = "; ".join(f"**{run}** = " + RUN_TEXT[run].format(**names, what=run_what(cfg, run)) for run in runs(cfg))
    lines += [f"Runs: {text}. {fmt_num(len(pairs(cfg)))} stores, one crosscoder per store.", ""]
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
                        footer=footer(ctx, tables), tables=tables)
