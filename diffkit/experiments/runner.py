"""Run the toy experiments by name, write each report and the index (``diffkit experiment``)."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import DiffkitError
from .common import ExperimentConfig, ExperimentResult, ModelCache, run_conditions, save_config, summarize
from .report import SUMMARY_COLS, write_report

# name -> module (each defines TITLE, HYPOTHESIS and run(cfg, out, cache, log) -> Outcome)
EXPERIMENTS = {"seeds": "seeds", "data": "data_shift", "architecture": "architecture", "objective": "objective",
               "width": "width", "scale-up": "scaleup"}


@dataclass
class Outcome:
    """What the index needs from one experiment."""

    name: str
    title: str
    hypothesis: str
    held: str          # "held", "partly", "did not hold"
    verdict: str       # one or two sentences with the numbers
    headline: dict     # a few numbers for the index table
    seconds: float
    report: Path
    summary: list = field(default_factory=list)


def by_label(summary: list[dict]) -> dict:
    return {s["condition"]: s for s in summary}


def mean_r2(s: dict, kind: str = "lin") -> float:
    """Mean of the two directions' held-out R² of one condition's summary."""
    return (s[f"{kind}_r2_ab"] + s[f"{kind}_r2_ba"]) / 2


def run_standard(cfg: ExperimentConfig, out: Path, cache: ModelCache, log: Callable[[str], None], conditions: list,
                 title: str, intro: list[str], hypothesis: str,
                 judge: Callable[[dict], tuple[str, str, dict]],
                 extra: Callable[[ExperimentResult, Path, str], list[str]] | None = None) -> Outcome:
    """Save the config, run every condition, judge the hypothesis, write ``report.md``."""
    save_config(cfg, conditions, out)
    result = run_conditions(cfg, conditions, cache, log)
    summary = summarize(result.rows, SUMMARY_COLS)
    held, verdict, headline = judge(by_label(summary))
    more = extra(result, out, cfg.command(out.parent)) if extra else []
    report = write_report(result, out, title, intro, hypothesis, f"{held.capitalize()}. {verdict}", more)
    return Outcome(cfg.name, title, hypothesis, held, verdict, headline, result.seconds, report, summary)


def check_names(name: str) -> list[str]:
    if name == "all":
        return list(EXPERIMENTS)
    if name not in EXPERIMENTS:
        raise DiffkitError(f"unknown experiment {name!r}: use one of {', '.join(EXPERIMENTS)} or all")
    return [name]


def check_out(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffkitError(f"--out {out} is a file: pass a directory path (it is created if missing)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DiffkitError(f"--out {out}: {parent} is a file, not a directory: choose another --out")
            break
    return out


def run_experiments(name: str, out: Path, quick: bool = False, threads: int = 1,
                    log: Callable[[str], None] = print) -> list[Outcome]:
    """Run ``name`` (or ``all``) into ``out/NAME/``; ``all`` also writes ``out/index.md``."""
    import torch

    names = check_names(name)
    out = check_out(out)
    torch.set_num_threads(threads)
    cache = ModelCache()
    outcomes = []
    t0 = time.perf_counter()
    for i, n in enumerate(names, 1):
        log(f"[{i}/{len(names)}] {n}")
        module = importlib.import_module(f"{__package__}.{EXPERIMENTS[n]}")
        cfg = ExperimentConfig.make(n, quick, threads)
        t = time.perf_counter()
        outcome = module.run(cfg, out / n, cache, log)
        outcome.seconds = time.perf_counter() - t
        outcomes.append(outcome)
        log(f"  {n}: {outcome.held} ({outcome.seconds:.0f} s) -> {outcome.report}")
    total = time.perf_counter() - t0
    if name == "all":
        from .index import write_index

        write_index(outcomes, out, quick, total)
    log(f"done in {total:.0f} s: " + "; ".join(f"{o.name} {o.held}" for o in outcomes))
    return outcomes
