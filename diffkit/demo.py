"""``diffkit demo``: a model organism, end to end, on the zoo, in a few minutes on 2 cores.

The demo is the pipeline (:mod:`diffkit.pipeline`) on its packaged config,
``diffkit/pipeline/configs/demo.toml`` (``diffkit run`` of that file does the same). Three pairs, so
that both methods can be read against controls:

- **diff**: zoo:base vs zoo:backdoor (a planted trigger and response, marked token by token in the
  store's corpus, ``organism:backdoor``), each with its own SAE at ``blocks.1`` — the question, with
  its answer known: the report leads with where each method ranks the planted features;
- **SAE-seed control**: zoo:base vs itself, its SAE vs one trained from another seed (the
  crosscoder sees two identical models) — the noise floor of each method;
- **model-seed pair**: zoo:base vs zoo:base-seed1 — another network trained the same way.

Large artifacts (stores, diffs, crosscoders, comparisons) go to ``work`` (``runs/demo``, not
committed); the report to ``out`` (``reports/demo``: report.md, figures/, tables/). The demo always
starts from scratch (``diffkit run`` of the config resumes instead).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class DemoConfig:
    """The demo's command-line sizes (saved as ``demo_config.json``; the resolved pipeline config is ``config.json``)."""

    tokens: int = 100_000           # per activation store
    cc_tokens: int = 300_000        # crosscoder training tokens (the organisms benchmark's size)
    cc_dict_size: int = 2048
    cc_k: int = 32
    cc_batch_size: int = 2048
    cc_lr: float = 1e-3
    threads: int = 2


def run_demo(out: Path, work: Path, cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] = print,
             progress: bool = False, command: str = "diffkit demo") -> Path:
    from .pipeline.config import load_config, packaged
    from .pipeline.runner import run_pipeline
    from .io import atomic_write_json

    pcfg = load_config(packaged("demo"), {
        "work": str(work), "out": str(out), "threads": cfg.threads, "data.tokens": cfg.tokens,
        "crosscoder.tokens": cfg.cc_tokens, "crosscoder.dict_size": cfg.cc_dict_size, "crosscoder.k": cfg.cc_k,
        "crosscoder.batch_size": cfg.cc_batch_size, "crosscoder.lr": cfg.cc_lr})
    results = run_pipeline(pcfg, log=log, progress=progress, command=command, overwrite=True)
    atomic_write_json(Path(work) / "demo_config.json", asdict(cfg))
    return Path(results["report"]["report"])
