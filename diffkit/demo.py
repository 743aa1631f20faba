"""``diffkit demo``: the embedded default, end to end, on the zoo, in a few minutes on 2 cores.

Stages (one progress bar each, on stderr): the zoo models' held-out losses; paired activations of
three pairs; the training-free diff of each (lstsq map + SAE alignment); a crosscoder on each
store; the head-to-head comparison of each (:mod:`diffkit.compare`); the report
(:mod:`diffkit.report`). The pairs are chosen so that both methods can be read against controls:

- **diff**: zoo:base vs zoo:finetuned, each with its own SAE — the question;
- **SAE-seed control**: zoo:base vs itself, its SAE vs one trained from another seed (the
  crosscoder sees two identical models) — the noise floor of each method;
- **model-seed pair**: zoo:base vs zoo:base-seed1 — another network trained the same way.

Large artifacts (stores, diffs, crosscoders, comparisons) go to ``work`` (``runs/demo``, not
committed); the report to ``out`` (``reports/demo``: report.md, figures/, tables/).
"""

from __future__ import annotations

import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import __version__

STORES = (("diff", "zoo:base", "zoo:finetuned"), ("same", "zoo:base", "zoo:base"),
          ("seed", "zoo:base", "zoo:base-seed1"))
# (label, store, SAE of A, SAE of B, what the row is, report role)
DIFFS = (("diff", "diff", "zoo:base", "zoo:finetuned", "base vs finetuned", "main"),
         ("sae-seed control", "same", "zoo:base", "zoo:base@seed1", "base vs base, SAE seed 0 vs 1", "sae-seed"),
         ("model-seed pair", "seed", "zoo:base", "zoo:base-seed1", "base vs base-seed1", "model-seed"))


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo (saved as ``demo_config.json`` in the work directory)."""

    tokens: int = 100_000           # per activation store
    cc_tokens: int = 600_000        # crosscoder training tokens (the zoo recipe: ~49 s on 2 threads)
    cc_dict_size: int = 4096
    cc_k: int = 32
    cc_batch_size: int = 2048
    cc_lr: float = 1e-3
    threads: int = 2


def _bar(desc: str, total: int, progress: bool):
    from .progress import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=True)


def run_demo(out: Path, work: Path, cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] = print,
             progress: bool = False, command: str = "diffkit demo") -> Path:
    import torch

    from baselines.crosscoder.train import TrainConfig, train

    from .activations import CollectConfig, collect_activations
    from .compare import CompareConfig, compare
    from .diff import AlignConfig, align, save_diff
    from .linear_map import LinearMap
    from .models import load_model
    from .report import load_run, start_report, write_report
    from .saes import load_sae
    from .store_format import atomic_write_json
    from .zoo import SAE_HOOK
    from .zoo.build import heldout_losses

    torch.set_num_threads(min(cfg.threads, torch.get_num_threads()))
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "demo_config.json", asdict(cfg))
    t_start = time.time()
    stage_s: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        stage_s[name] = time.time() - t0
        log(f"  {name}: {stage_s[name]:.1f} s")

    log("[1/6] held-out loss of the zoo models")
    t0 = time.time()
    loss_rows = []
    with _bar("[1/6] zoo losses", 3, progress) as bar:
        for spec in ("zoo:base", "zoo:finetuned", "zoo:base-seed1"):
            losses = heldout_losses(load_model(spec).model)
            loss_rows.append({"model": spec, "prose": losses["prose"], "code": losses["code"]})
            bar.update(1)
    stage("zoo losses", t0)

    log("[2/6] collect paired activations")
    t0 = time.time()
    store_rows = []
    with _bar("[2/6] collect", len(STORES), progress) as bar:
        for label, a, b in STORES:
            path = work / f"store-{label}"
            ccfg = CollectConfig(model_a=a, model_b=b, hook_a=SAE_HOOK, hook_b=SAE_HOOK, corpus="mixed",
                                 tokens=cfg.tokens)
            s = collect_activations(ccfg, path, overwrite=path.exists(), progress=False)
            store_rows.append({"store": label, "model A": a, "model B": b, "tokens": s.tokens, "train": s.train_tokens,
                               "held-out": s.heldout_tokens, "scale A": s.scale_a, "scale B": s.scale_b,
                               "tokens/s": s.tokens_per_second})
            bar.update(1)
    stage("collect", t0)

    from .activations import ActivationStore

    log("[3/6] training-free diff: fit the map, align the SAEs")
    t0 = time.time()
    maps: dict[str, Path] = {}
    with _bar("[3/6] align", len(DIFFS), progress) as bar:
        for label, store_label, sae_a, sae_b, _, _ in DIFFS:
            store = ActivationStore.open(work / f"store-{store_label}")
            align_dir = work / f"align-{label.split()[0]}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if store_label not in maps:
                    maps[store_label] = LinearMap().fit(store).save(align_dir / "map")
                lmap = LinearMap.load(maps[store_label])
                result = align(store, load_sae(sae_a), load_sae(sae_b), lmap, AlignConfig())
            save_diff(result, align_dir, {"acts": str(work / f"store-{store_label}"), "sae_a": sae_a, "sae_b": sae_b,
                                          "map": str(maps[store_label])})
            bar.update(1)
    stage("align", t0)

    log(f"[4/6] crosscoders: {cfg.cc_dict_size} latents, k {cfg.cc_k}, {cfg.cc_tokens:,} tokens each")
    t0 = time.time()
    for label, _, _ in STORES:
        tcfg = TrainConfig(acts=str(work / f"store-{label}"), out=str(work / f"crosscoder-{label}"),
                           dict_size=cfg.cc_dict_size, k=cfg.cc_k, batch_size=cfg.cc_batch_size, lr=cfg.cc_lr,
                           tokens=cfg.cc_tokens, checkpoint_every=0)
        _fresh(Path(tcfg.out))
        s = train(tcfg, progress=progress, threads=cfg.threads, log=lambda _: None)
        log(f"  crosscoder {label}: {s['steps']} steps in {s['seconds']:.1f} s, held-out FVE "
            f"{s['heldout'].get('fve_a', float('nan')):.3f} / {s['heldout'].get('fve_b', float('nan')):.3f}")
    stage("crosscoders", t0)

    log("[5/6] head to head: compare each diff with its crosscoder")
    t0 = time.time()
    compare_dirs = []
    with _bar("[5/6] compare", len(DIFFS), progress) as bar:
        for label, store_label, _, _, _, _ in DIFFS:
            name = label.split()[0]
            ccfg = CompareConfig(align=str(work / f"align-{name}"), crosscoder=str(work / f"crosscoder-{store_label}"),
                                 acts=str(work / f"store-{store_label}"), out=str(work / f"compare-{name}"))
            compare(ccfg)
            compare_dirs.append(ccfg.out)
            bar.update(1)
    stage("compare", t0)

    log("[6/6] report")
    t0 = time.time()
    with _bar("[6/6] report", 1, progress) as bar:
        runs = [load_run(d, label=label, what=what, role=role) for d, (label, _, _, _, what, role)
                in zip(compare_dirs, DIFFS)]
        tables = start_report(out, command)
        preamble = _preamble(tables, loss_rows, store_rows, SAE_HOOK)
        total_before = time.time() - t_start
        footer = ["## How this report was made", "", f"`{command}` (`make demo`) on {platform.machine()}, "
                  f"{torch.get_num_threads()} torch threads, diffkit {__version__}. Large artifacts: `{work}/` (not "
                  "committed). Wall time per stage (the report itself takes a few seconds more):", ""]
        footer += tables.add("stages", _stage_frame(stage_s, total_before),
                             fmt={"wall s": lambda v: f"{v:.1f}"})
        report = write_report(out, runs, command, title="diffkit demo: the embedded zoo, head to head",
                              preamble=preamble, footer=footer, tables=tables)
        bar.update(1)
    stage("report", t0)
    log(f"report: {report} ({time.time() - t_start:.0f} s in all)")
    return report


def _fresh(path: Path) -> None:
    """Remove an earlier demo crosscoder run (the demo always trains from scratch)."""
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _stage_frame(stage_s: dict, total: float):
    import pandas as pd

    return pd.DataFrame([{"stage": k, "wall s": v} for k, v in stage_s.items()] +
                        [{"stage": "total before the report", "wall s": total}])


def _preamble(tables, loss_rows: list, store_rows: list, hook: str) -> list[str]:
    import pandas as pd

    from .report.markdown import fmt_num

    lines = ["## The zoo", "",
             "Tiny byte-level transformers shipped with diffkit. Held-out next-token loss (nats/token): the fine-tune "
             "should be better than base on code and worse on prose; base-seed1 should match base.", ""]
    lines += tables.add("models", pd.DataFrame(loss_rows), fmt={"model": lambda v: f"`{v}`"})
    lines += [f"Activation stores (hook `{hook}`, corpus `mixed`, ctx 128). Scale = sqrt(d_model) / mean ‖x‖ over "
              "train tokens, BOS and padding excluded; applied on read.", ""]
    lines += tables.add("stores", pd.DataFrame(store_rows),
                        fmt={"model A": lambda v: f"`{v}`", "model B": lambda v: f"`{v}`",
                             "tokens/s": lambda v: f"{v:,.0f}"})
    lines += ["Runs: **diff** = base vs finetuned with their own SAEs; **sae-seed control** = base vs base with "
              "SAEs of seeds 0 and 1 (the crosscoder sees two identical models): the noise floor of both methods; "
              "**model-seed pair** = base vs base-seed1, another network from the same recipe. "
              f"{fmt_num(len(store_rows))} stores, one crosscoder per store.", ""]
    return lines
