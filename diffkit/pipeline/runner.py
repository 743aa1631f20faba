"""Run (or resume) a pipeline config: stages in order, each skipped when its marker says it is done.

Each stage writes its artifacts under the work folder, then ``stages/NAME.json`` (its result and wall
``seconds``); a stage whose marker exists is kept when the command runs again, so an interrupted run
resumes at the first unfinished stage. ``config.json`` is the resolved config of the last run: a
resume with other options drops the markers of the stages those options reach (:data:`DEPENDS`) and
of every stage downstream of them (:data:`INPUTS`). The report is always rewritten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ..errors import DiffkitError
from .config import PipelineConfig, flat, from_dict

STAGES = ("finetune", "losses", "collect", "saes", "map", "align", "crosscoder", "compare", "answer", "report")
# The options each stage reads (a dotted key, or a section ending in "."). Options not named here
# (threads, device, work, out, report.*) change how a stage runs or where its output goes, not what it makes.
DEPENDS = {"finetune": ("models.", "finetune.", "seed"),
           "losses": ("models.", "controls.", "report.losses", "report.loss_sequences"), "collect": ("models.", "data.", "seed", "controls."),
           "saes": ("saes.",), "map": (), "align": (), "crosscoder": ("crosscoder.", "seed"), "compare": ("compare.",), "answer": ()}
INPUTS = {"finetune": (), "losses": ("finetune",), "collect": ("finetune",), "saes": ("collect",), "map": ("collect",), "align": ("saes", "map"),
          "crosscoder": ("collect",), "compare": ("align", "crosscoder"), "answer": ("align", "compare")}


def active_stages(cfg: PipelineConfig) -> list[str]:
    from ..organisms import label_names

    if cfg.data.store:  # a given store carries an answer key when it has labels
        from .stages import given_manifest

        keyed = len(given_manifest(cfg).get("labels", {}).get("names", ())) > 1
    else:  # an organism corpus: its stores carry an answer key
        keyed = len(label_names(cfg.data.corpus) or ()) > 1
    skip = {"losses": not cfg.report.losses, "finetune": cfg.models.b != "finetune", "answer": not keyed}
    return [s for s in STAGES if not skip.get(s)]


def stale_stages(old: PipelineConfig, new: PipelineConfig) -> list[str]:
    """The stages a resume must rerun when the config changes from ``old`` to ``new`` (in stage order)."""
    a, b = flat(old), flat(new)
    changed = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
    stale = {stage for stage, deps in DEPENDS.items()
             if any(k == d or (d.endswith(".") and k.startswith(d)) for k in changed for d in deps)}
    stale |= {later for s in list(stale) for later in downstream(s)}
    return [s for s in INPUTS if s in stale]


def downstream(stage: str) -> list[str]:
    """The stages that read ``stage``'s output, directly or not (in stage order)."""
    found = {stage}
    for name, inputs in INPUTS.items():
        if any(i in found for i in inputs):
            found.add(name)
    return [s for s in INPUTS if s in found and s != stage]


def marker(work: Path, name: str) -> Path:
    return work / "stages" / f"{name}.json"


def sync_config(work: Path, cfg: PipelineConfig, log: Callable[[str], None] = print) -> list[str]:
    """Save ``cfg`` as ``work/config.json``; on a resume with other options, drop the markers of the stages
    they reach. Returns the stages dropped."""
    from ..io import atomic_write_json

    path, stale = work / "config.json", []
    if path.exists():
        try:
            old = from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, DiffkitError) as exc:
            raise DiffkitError(f"{path} is not a pipeline config ({exc}): remove {work} or use another work folder") \
                from None
        stale = [s for s in stale_stages(old, cfg) if marker(work, s).exists()]
        for name in stale:
            marker(work, name).unlink()
        if stale:
            log(f"options changed since the last run in {work}: rerunning {', '.join(stale)}")
    (work / "stages").mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, cfg.to_json())
    return stale


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = print, progress: bool = True,
                 command: str = "diffkit run", overwrite: bool = False) -> dict:
    """Run (or resume) every stage of ``cfg``; return ``{stage: result}`` (each with its wall ``seconds``)."""
    import shutil

    import torch

    from ..io import atomic_write_json
    from .stages import STAGE_FNS, Context

    work, out = Path(cfg.work), Path(cfg.out)
    if overwrite and work.exists():
        shutil.rmtree(work)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffkitError(f"device {cfg.device!r} was asked for but CUDA is not available: set device = \"cpu\"")
    if cfg.data.store:  # before any marker is dropped: a store that does not open or fit loses nothing
        from ..activations import ActivationStore
        from .stages import check_given_hooks

        check_given_hooks(cfg, ActivationStore.open(cfg.data.store))
    sync_config(work, cfg, log)
    torch.set_num_threads(min(cfg.threads, torch.get_num_threads()) if cfg.device == "cpu" else cfg.threads)
    ctx = Context(cfg=cfg, work=work, out=out, results={}, log=log, progress=progress, command=command)
    names = active_stages(cfg)
    t_start = time.time()
    for i, name in enumerate(names, 1):
        path = marker(work, name)
        if name != "report" and path.exists():
            ctx.results[name] = json.loads(path.read_text())
            log(f"[{i}/{len(names)}] {name}: done earlier ({ctx.results[name]['seconds']:.1f} s), kept")
            continue
        log(f"[{i}/{len(names)}] {name}")
        for later in downstream(name):  # what this stage makes anew, the stages after it must read anew
            marker(work, later).unlink(missing_ok=True)
        t0 = time.time()
        result = STAGE_FNS[name](ctx)
        ctx.results[name] = {**result, "seconds": time.time() - t0}
        if name != "report":
            atomic_write_json(path, ctx.results[name])
        log(f"  {name}: {ctx.results[name]['seconds']:.1f} s")
    log(f"report: {ctx.results['report']['report']} ({time.time() - t_start:.0f} s this run)")
    return ctx.results


# ---- the plan (--dry-run) -----------------------------------------------------------------------------

def d_model(spec: str) -> int | None:
    """A model's width without loading it (None when only loading would tell)."""
    if spec == "zoo:smollm2":
        from ..zoo import smollm2

        return smollm2.D_MODEL
    try:
        if spec.startswith("zoo:"):
            from ..zoo import model_dir

            path = model_dir(spec[4:])
        else:
            path = Path(spec)
        if (path / "model.json").exists():
            return int(json.loads((path / "model.json").read_text())["config"]["d_model"])
        if (path / "config.json").exists():
            hf = json.loads((path / "config.json").read_text())
            return int(next(hf[k] for k in ("hidden_size", "n_embd", "d_model") if k in hf))
    except (DiffkitError, OSError, KeyError, StopIteration, ValueError):
        return None
    return None


def _num(n: float | None, unit: str = "") -> str:
    if n is None:
        return "?"
    for u in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or u == "T":
            return f"{n:,.0f}{u}{unit}" if u == "" else f"{n:.1f}{u}{unit}"
        n /= 1000
    return "?"


def plan_text(cfg: PipelineConfig) -> str:
    """What a run of ``cfg`` will do and how big its artifacts get (``--dry-run``; loads no model)."""
    from .stages import pairs, runs, sae_roles

    work = Path(cfg.work)
    stale = set()
    if (work / "config.json").exists():
        try:
            stale = set(stale_stages(from_dict(json.loads((work / "config.json").read_text())), cfg))
        except (json.JSONDecodeError, DiffkitError):
            stale = set(STAGES)
    from .stages import given_manifest, given_sources, model_b

    given = given_sources(cfg) if cfg.data.store else None
    width = {(label, side): int(given[side]["d_model"]) if given else
             d_model(cfg.models.a if cfg.models.b == "finetune" and m == model_b(cfg) else m)
             for label, a, b in pairs(cfg) for side, m in (("a", a), ("b", b))}
    itemsize = 2 if cfg.data.dtype == "float16" else 4
    t, c = cfg.saes.train, cfg.crosscoder
    _, name_a, name_b = pairs(cfg)[0]
    b_name = f"{cfg.models.a} fine-tuned on {cfg.finetune.corpus!r} ({cfg.finetune.steps} steps x {cfg.finetune.batch} x " \
        f"{cfg.finetune.ctx} tokens)" if cfg.models.b == "finetune" else name_b
    hook = f"{given['a']['hook']} / {given['b']['hook']}" if given else cfg.data.hook
    lines = [f"diffkit run: {name_a} vs {b_name} at {hook}; work {work}, report {cfg.out}; "
             f"device {cfg.device}, {cfg.threads} threads"]
    store_total = 0
    for label, a, b in pairs(cfg):
        wa, wb = width[label, "a"], width[label, "b"]
        if given:
            from ..activations import store_bytes

            manifest = given_manifest(cfg)
            size = store_bytes(manifest)
            store_total += size
            lines.append(f"  store-{label:<5} {a} vs {b}: given, {cfg.data.store} ({manifest['n_tokens']['all']:,} "
                         f"tokens, d_model {wa} / {wb}, {_num(size, 'B')}; not collected)")
            continue
        size = None if None in (wa, wb) else cfg.data.tokens * (wa + wb) * itemsize
        store_total += size or 0
        lines.append(f"  store-{label:<5} {a} vs {b}: {cfg.data.tokens:,} tokens of {cfg.data.corpus!r}, ctx "
                     f"{cfg.data.ctx}, d_model {wa or '?'} / {wb or '?'} -> {_num(size, 'B')}")
    for role, (spec, store, side) in sae_roles(cfg).items():
        w = width[store, side]
        what = (f"train {t.arch} d_sae {t.d_sae:,}, k {t.k}, {t.tokens:,} samples (batch {t.batch_size}), seed "
                f"{t.seed_of(role)}, {_num(w and 2 * w * t.d_sae + t.d_sae + w)} params"
                if spec == "train" else f"{spec} (given)")
        lines.append(f"  SAE {role:<9} {what}")
    cc = [None if None in (width[lab, "a"], width[lab, "b"]) else
          2 * c.dict_size * (width[lab, "a"] + width[lab, "b"]) + c.dict_size for lab, _, _ in pairs(cfg)]
    lines.append(f"  crosscoder  BatchTopK {c.dict_size:,} latents, k {c.k}, {c.tokens:,} tokens, one per store: "
                 f"{', '.join(_num(p) for p in cc)} params")
    lines.append(f"  runs        {', '.join(runs(cfg))}; store bytes in all ~{_num(store_total, 'B')}")
    state = []
    for name in active_stages(cfg):
        done = name != "report" and marker(work, name).exists() and name not in stale
        state.append(f"{name} ({'done, kept' if done else 'rerun: options changed' if name in stale else 'to run'})")
    lines.append(f"  stages      {', '.join(state)}")
    return "\n".join(lines)
