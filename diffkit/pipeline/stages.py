"""The pipeline's stages: each one job, through the library calls the single commands use.

A stage is ``fn(ctx) -> dict`` (its result, saved as ``WORK/stages/NAME.json`` by the runner). What
the config makes is fixed by :func:`pairs` and :func:`runs`:

- stores: ``diff`` (A vs B); ``same`` (A vs A) for the SAE-seed control; ``seed`` (A vs the model-seed model);
- runs: ``diff`` (A's SAE vs B's), ``sae-seed control`` (A's SAE vs the null SAE, on ``same``),
  ``model-seed pair`` (A's SAE vs the seed model's, on ``seed``).

Work layout: ``store-LABEL``, ``sae-ROLE`` (trained SAEs), ``map-LABEL``, ``align-RUN``, ``crosscoder-LABEL``,
``compare-RUN`` (RUN = the run label's first word).
"""

from __future__ import annotations

import functools
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import PipelineConfig

# run label -> (store label, SAE role of A, SAE role of B, report role)
RUN_ROLES = {"diff": ("diff", "a", "b", "main"), "sae-seed control": ("same", "a", "null", "sae-seed"),
             "model-seed pair": ("seed", "a", "seed_pair", "model-seed")}


@dataclass
class Context:
    cfg: PipelineConfig
    work: Path
    out: Path
    results: dict                      # {stage: result} of the stages run or kept so far
    log: Callable[[str], None]
    progress: bool
    command: str


def model_b(cfg: PipelineConfig) -> str:
    """Model B's spec: ``models.b``, or the fine-tune's directory when it is ``finetune``."""
    return str(Path(cfg.work) / "finetuned") if cfg.models.b == "finetune" else cfg.models.b


def given_manifest(cfg: PipelineConfig) -> dict:
    """``data.store``'s manifest, read (and its seal checked) once per version of the file: the plan, the
    stage list, the store names and the report all ask for it."""
    from ..store_format import MANIFEST

    path = Path(cfg.data.store) / MANIFEST
    return _read_manifest(str(path.parent), path.stat().st_mtime_ns if path.exists() else 0)


@functools.lru_cache(maxsize=8)
def _read_manifest(root: str, mtime_ns: int) -> dict:
    from ..store_format import read_manifest

    return read_manifest(Path(root))


def given_sources(cfg: PipelineConfig) -> dict:
    """``data.store``'s manifest ``sources`` ({"a": {"spec", "hook", "d_model"...}, "b": ...})."""
    return given_manifest(cfg)["sources"]


def store_dir(cfg: PipelineConfig, label: str) -> Path:
    """Where the store ``label`` is: ``data.store`` for the diff when given, else ``WORK/store-LABEL``."""
    return Path(cfg.data.store) if cfg.data.store and label == "diff" else Path(cfg.work) / f"store-{label}"


def pairs(cfg: PipelineConfig) -> list[tuple[str, str, str]]:
    """(label, model A, model B) of each store the config reads. With ``data.store`` only the diff's: the
    A vs A store needs the model (the null SAE still calibrates the diff)."""
    if cfg.data.store:
        names = given_sources(cfg) if not (cfg.models.a and cfg.models.b) else {}
        return [("diff", cfg.models.a or str(names["a"].get("spec", "A")),
                 cfg.models.b or str(names["b"].get("spec", "B")))]
    a, b = cfg.models.a, model_b(cfg)
    out = [("diff", a, b)]
    if cfg.controls.sae_seed:
        out.append(("same", a, a))
    if cfg.controls.model_seed:
        out.append(("seed", a, cfg.controls.model_seed))
    return out


def runs(cfg: PipelineConfig) -> list[str]:
    """The diffs the config makes (labels of :data:`RUN_ROLES`), main first."""
    stores = {label for label, _, _ in pairs(cfg)}
    return [r for r, (store, _, _, _) in RUN_ROLES.items() if store in stores]


def sae_roles(cfg: PipelineConfig) -> dict[str, tuple[str, str]]:
    """{role: (SAE spec, store label the SAE reads when trained, side)} for the SAEs the runs use."""
    roles = {"a": (cfg.saes.a, "diff", "a"), "b": (cfg.saes.b, "diff", "b")}
    if cfg.controls.sae_seed:
        roles["null"] = (cfg.saes.null, "diff", "a")
    if cfg.controls.model_seed:
        roles["seed_pair"] = (cfg.saes.seed_pair, "seed", "b")
    return roles


def run_dir(work: Path, kind: str, run: str) -> Path:
    return work / f"{kind}-{run.split()[0]}"


def _short(spec: str) -> str:
    return spec.removeprefix("zoo:")


def run_what(cfg: PipelineConfig, run: str) -> str:
    """The report's one-line description of a run."""
    _, a, b = pairs(cfg)[0]
    a, b = _short(a), _short(b if cfg.models.b != "finetune" else "fine-tuned A")
    if run == "diff":
        return f"{a} vs {b}"
    if run == "model-seed pair":
        return f"{a} vs {_short(cfg.controls.model_seed)}"
    seeds = [_sae_seed(cfg, s) for s in (cfg.saes.a, cfg.saes.null)]
    seeds[1] = cfg.saes.train.null_seed if cfg.saes.null == "train" else seeds[1]
    which = f"SAE seed {seeds[0]} vs {seeds[1]}" if None not in seeds else f"SAE {cfg.saes.a} vs {cfg.saes.null}"
    return f"{a} vs {a}, {which}"


def _sae_seed(cfg: PipelineConfig, spec: str) -> int | None:
    if spec == "train":
        return cfg.saes.train.seed
    if spec.startswith("zoo:"):
        _, _, seed = spec.split("/")[0].partition("@")  # zoo:NAME[@seedN][/blocks.1]
        return int(seed[4:]) if seed.startswith("seed") and seed[4:].isdigit() else 0
    return None


# ---- stages -------------------------------------------------------------------------------------------

def stage_finetune(ctx: Context) -> dict:
    """Model A fine-tuned on ``finetune.corpus`` -> ``WORK/finetuned`` (an HF directory)."""
    from ..progress import tqdm

    from .finetune import finetune, hf_dir

    f, out = ctx.cfg.finetune, ctx.work / "finetuned"
    with tqdm(total=f.steps, desc="fine-tune", unit="step", disable=not ctx.progress) as bar:
        def tick(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        losses = finetune(hf_dir(ctx.cfg.models.a), out, f, seed=ctx.cfg.seed, device=ctx.cfg.device, progress=tick)
    return {"dir": str(out), "train_loss": losses, "tokens": f.steps * f.batch * f.ctx}


def model_losses(loaded: Any, n_seqs: int = 64, ctx: int = 128, device: str = "cpu") -> dict[str, float]:
    """Held-out next-token loss (nats/token) of a loaded model on the prose and code corpora's held-out
    documents: the first ``n_seqs`` sequences of ``ctx`` tokens of each, mean over real targets."""
    import numpy as np
    import torch

    from ..corpora import token_sequences
    from ..zoo.build import next_token_loss

    out = {}
    for domain in ("prose", "code"):
        seqs = []
        for seq in token_sequences(domain, loaded.tokenizer, ctx, split="heldout"):
            seqs.append(seq)
            if len(seqs) >= n_seqs:
                break
        ids = torch.from_numpy(np.stack([s.ids for s in seqs]).astype(np.int64)).to(device)
        lengths = torch.as_tensor([s.length for s in seqs], device=device)
        step = 64 if loaded.d_model <= 512 else 8  # one batch for the zoo; a big vocabulary's logits stay bounded
        with torch.no_grad():
            total = sum(float(next_token_loss(loaded.model, ids[i:i + step], lengths[i:i + step]))
                        * int((lengths[i:i + step] - 1).sum()) for i in range(0, len(ids), step))
        out[domain] = total / int((lengths - 1).sum())
    return out


def stage_losses(ctx: Context) -> dict:
    """Held-out loss of each model of the config (:func:`model_losses`)."""
    from ..models import load_model

    n, rows = ctx.cfg.report.loss_sequences, []
    for spec in dict.fromkeys(m for _, a, b in pairs(ctx.cfg) for m in (a, b)):
        rows.append({"model": spec, **model_losses(load_model(spec, device=ctx.cfg.device), n, device=ctx.cfg.device)})
    return {"rows": rows, "sequences": n, "ctx": 128}


def stage_collect(ctx: Context) -> dict:
    """Collect each store of :func:`pairs`; with ``data.store``, open and check that one instead."""
    from ..activations import ActivationStore, CollectConfig, collect_activations, store_summary

    d, rows = ctx.cfg.data, []
    for label, a, b in pairs(ctx.cfg):
        path = store_dir(ctx.cfg, label)
        if d.store:
            s = store_summary(ActivationStore.open(path))  # its hooks checked by run_pipeline
            ctx.log(f"  store {path}: given ({s.tokens:,} tokens: {s.train_tokens:,} train, {s.heldout_tokens:,} "
                    "held out), not collected")
        else:
            ccfg = CollectConfig(model_a=a, model_b=b, hook_a=d.hook, hook_b=d.hook_b or d.hook, corpus=d.corpus,
                                 tokens=d.tokens, ctx=d.ctx, seed=ctx.cfg.seed, batch_size=d.batch_size,
                                 dtype=d.dtype, max_norm_ratio=d.max_norm_ratio)
            s = collect_activations(ccfg, path, overwrite=path.exists(), device=ctx.cfg.device, progress=ctx.progress)
        rows.append({"store": label, "model A": a, "model B": b, "tokens": s.tokens, "train": s.train_tokens,
                     "held-out": s.heldout_tokens, "scale A": s.scale_a, "scale B": s.scale_b,
                     "tokens/s": s.tokens_per_second, "bytes": s.bytes, "massive_dropped": s.massive_dropped})
    return {"stores": rows}


def check_given_hooks(cfg: PipelineConfig, store: Any) -> Any:
    """``data.store``'s hooks must be ``data.hook`` / ``data.hook_b`` when those are set; returns the store."""
    from ..errors import DiffkitError

    for side, want in (("a", cfg.data.hook), ("b", cfg.data.hook_b or cfg.data.hook)):
        if want and store.hook(side) != want:
            raise DiffkitError(f"data.store {cfg.data.store} holds model {side.upper()} at {store.hook(side)!r}, not "
                               f"data.hook {want!r}: fix data.hook or leave it unset")
    return store


def _clear_stale_sae(out: Path, trainer_cfg: Any, collect_marker: Path) -> None:
    """Remove an SAE (or an interrupted one's ``.partial``) that the trainer must not keep or resume: one
    trained with other options, or older than the store (a store collected again keeps its path)."""
    import json
    from dataclasses import asdict

    from ..sae_train import RUN_JSON, TRAIN_JSON, partial_dir

    for path, record in ((out, TRAIN_JSON), (partial_dir(out), RUN_JSON)):
        if not path.exists():
            continue
        try:
            same = json.loads((path / record).read_text()).get("config") == asdict(trainer_cfg)
        except (OSError, ValueError, AttributeError):
            same = False
        if not same or not collect_marker.exists() or path.stat().st_mtime < collect_marker.stat().st_mtime:
            shutil.rmtree(path)


def stage_saes(ctx: Context) -> dict:
    """Train the SAEs the config asks to ``train`` (into ``WORK/sae-ROLE``, :mod:`diffkit.sae_train`); pass the
    others through. An SAE left by an interrupted stage, with the same options and store, is kept or resumed."""
    from ..activations import ActivationStore
    from ..sae_train import train_sae_from_store

    t, result = ctx.cfg.saes.train, {}
    for role, (spec, store_label, side) in sae_roles(ctx.cfg).items():
        if spec != "train":
            result[role] = {"spec": spec}
            continue
        seed = t.seed_of(role)
        out, tcfg = ctx.work / f"sae-{role}", t.trainer_config(seed)
        _clear_stale_sae(out, tcfg, ctx.work / "stages" / "collect.json")
        store = ActivationStore.open(store_dir(ctx.cfg, store_label))
        m = train_sae_from_store(store, side, tcfg, out, resume=True, device=ctx.cfg.device,
                                 progress=ctx.progress)["metrics"]
        result[role] = {"spec": str(out), "trained": True, "seed": seed, "fve": m["fve"], "l0": m["l0"],
                        "dead_fraction": m["dead_fraction"]}
        ctx.log(f"  SAE {role} ({store.manifest['sources'][side].get('spec')}, seed {seed}): held-out FVE "
                f"{m['fve']:.3f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.1%}")
    return result


def stage_map(ctx: Context) -> dict:
    """The affine lstsq map of each store (both directions), saved at ``WORK/map-LABEL``."""
    from ..activations import ActivationStore
    from ..linear_map import LinearMap

    out = {}
    for label, _, _ in pairs(ctx.cfg):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[label] = str(LinearMap().fit(ActivationStore.open(store_dir(ctx.cfg, label)))
                             .save(ctx.work / f"map-{label}"))
    return {"maps": out}


def stage_align(ctx: Context) -> dict:
    from ..activations import ActivationStore
    from ..diff import AlignConfig, align, save_diff
    from ..linear_map import LinearMap
    from ..saes import load_sae

    saes, maps, result = ctx.results["saes"], ctx.results["map"]["maps"], {}
    for run in runs(ctx.cfg):
        store_label, role_a, role_b, _ = RUN_ROLES[run]
        acts = store_dir(ctx.cfg, store_label)
        spec_a, spec_b = saes[role_a]["spec"], saes[role_b]["spec"]
        store, out = ActivationStore.open(acts), run_dir(ctx.work, "align", run)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae_a, sae_b = load_sae(spec_a, device=ctx.cfg.device), load_sae(spec_b, device=ctx.cfg.device)
            lmap, acfg = LinearMap.load(maps[store_label]), AlignConfig(device=ctx.cfg.device)
            # The main diff gets the SAE-seed null of diffkit.calibrate when the config has a second SAE of A.
            null = {"a": load_sae(saes["null"]["spec"], device=ctx.cfg.device)} if run == "diff" and "null" in saes \
                else None
            if store.has_labels:  # an answer key: the divergence rides on align's pass, its rankings are kept
                from ..bench.organisms import training_free_methods

                diff, _, methods, masses = training_free_methods(store, lmap, sae_a, sae_b, acfg, null_saes=null)
            else:
                diff = align(store, sae_a, sae_b, lmap, acfg, null_saes=null)
        save_diff(diff, out, {"acts": str(acts), "sae_a": spec_a, "sae_b": spec_b, "map": maps[store_label]})
        rankings = save_rankings(out / RANKINGS, methods, masses["sae_b"]) if store.has_labels else None
        s = diff.summary
        result[run] = {"counts": s["counts"], "threshold": s["threshold"], "n_a": s["n_a"], "n_b": s["n_b"],
                       **({"rankings_sha256": rankings} if rankings else {})}
    return result


RANKINGS = "rankings.npz"  # beside a labelled store's diff: each method's scores of B's features, for the answer stage


def save_rankings(path: Path, methods: dict, sae_b_masses: tuple) -> str:
    """Each method's per-item scores (and per-token scores), and B's features' mass per label (atomic npz);
    returns its sha256 (the align stage's marker records it, the answer stage checks it)."""
    import io

    import numpy as np

    from ..io import atomic_write_bytes, sha256_bytes

    arrays = {"mass_b": sae_b_masses[0], "mass_b_by_label": sae_b_masses[1]}
    for i, (name, m) in enumerate(methods.items()):
        arrays[f"scores_{i}"] = m.scores
        if m.token_scores is not None:
            arrays[f"tokens_{i}"] = m.token_scores
    arrays["names"] = np.array(list(methods), dtype=str)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return sha256_bytes(buf.getvalue())


def load_rankings(path: Path, sha256: str | None) -> tuple[dict, tuple]:
    """(methods, (mass_b, mass_b_by_label)) as :func:`save_rankings` wrote them, checked against ``sha256``."""
    import numpy as np

    from ..bench.organisms import MethodResult
    from ..errors import DiffkitError
    from ..io import verify_sha256

    verify_sha256(path, sha256, "rerun the align stage (remove its marker stages/align.json)")
    try:
        z = np.load(path, allow_pickle=False)
        names = [str(n) for n in z["names"]]
        methods = {n: MethodResult(z[f"scores_{i}"], "sae_b", z[f"tokens_{i}"] if f"tokens_{i}" in z else None)
                   for i, n in enumerate(names)}
        return methods, (z["mass_b"], z["mass_b_by_label"])
    except (OSError, ValueError, KeyError) as exc:
        raise DiffkitError(f"{path} cannot be read ({exc}): rerun the align stage (remove its marker "
                           f"stages/align.json)") from None


def stage_answer(ctx: Context) -> dict:
    """Every method against the store's answer key (a labelled corpus, ``organism:NAME``), run by run: the
    rank of B's first planted feature, precision@10, token AUROC, and align's calibrated calls
    (:mod:`diffkit.bench.organisms_score`, the organisms benchmark's own scoring)."""
    from ..activations import ActivationStore
    from ..bench.organisms import calibrated_calls, crosscoder_method, live_features, score_methods
    from ..bench.organisms_score import DEFAULT_FACTOR
    from ..compare import ANALYSIS_DIR
    from ..diff import load_diff_json, load_table

    result = {}
    for run in runs(ctx.cfg):
        label = RUN_ROLES[run][0]
        store = ActivationStore.open(store_dir(ctx.cfg, label))
        if not store.has_labels:
            continue
        align_dir = run_dir(ctx.work, "align", run)
        methods, mass_b = load_rankings(align_dir / RANKINGS, ctx.results["align"][run].get("rankings_sha256"))
        masses = {"sae_b": mass_b}
        if "crosscoder" in ctx.cfg.methods:
            cc, masses["crosscoder:batchtopk"], _ = crosscoder_method(
                "batchtopk", ctx.work / f"crosscoder-{label}", run_dir(ctx.work, "compare", run) / ANALYSIS_DIR, store)
            methods["crosscoder batchtopk"] = cc
        labels = store.labels("all")
        metrics, counts, planted = score_methods(methods, masses, labels)
        table, summary = load_table(align_dir), load_diff_json(align_dir, "summary.json")
        result[run] = {"metrics": {m: {k: v for k, v in e.items() if k != "at_factor"} for m, e in metrics.items()},
                       "planted_counts": counts,
                       "calibrated": calibrated_calls(table, summary.get("calibration", {}),
                                                      planted["sae_b"][DEFAULT_FACTOR], live_features(table)),
                       "label_rates": {n: float((labels == i).mean()) for i, n in enumerate(store.label_names) if i}}
    return {"runs": result, "factor": DEFAULT_FACTOR, "behaviour": organism_behaviour(ctx)}


def organism_behaviour(ctx: Context) -> dict:
    """Did model B learn the planted behaviour, and A not? :mod:`diffkit.zoo.behaviour`'s held-out figures
    (backdoor: the response after the trigger; facts: the recalled place) for both models; {} for others."""
    from ..models import load_model
    from ..organisms import parse_spec
    from ..zoo.behaviour import backdoor_behaviour, facts_behaviour

    name, _ = parse_spec(ctx.cfg.data.corpus)
    if name not in ("backdoor", "facts"):
        return {}
    out = {}
    for role, spec in (("a", ctx.cfg.models.a), ("b", model_b(ctx.cfg))):
        loaded = load_model(spec, device=ctx.cfg.device)
        if name == "backdoor":  # a large model's forward is slow on a CPU: fewer held-out prompts
            n = 48 if loaded.d_model <= 512 else 16
            out[role] = backdoor_behaviour(loaded.model, loaded.tokenizer, n_prompts=n)
        else:
            out[role] = facts_behaviour(loaded.model, loaded.tokenizer)
        out[role]["model"] = spec
    return {"organism": name, **out}


def stage_crosscoder(ctx: Context) -> dict:
    from baselines.crosscoder.train import TrainConfig, train

    c, result = ctx.cfg.crosscoder, {}
    for label, _, _ in pairs(ctx.cfg):
        tcfg = TrainConfig(acts=str(store_dir(ctx.cfg, label)), out=str(ctx.work / f"crosscoder-{label}"),
                           dict_size=c.dict_size, k=c.k, batch_size=c.batch_size, lr=c.lr, tokens=c.tokens,
                           checkpoint_every=0, device=ctx.cfg.device, seed=ctx.cfg.seed)
        shutil.rmtree(tcfg.out, ignore_errors=True)  # always from scratch: the stage marker is the resume point
        s = train(tcfg, progress=ctx.progress, threads=ctx.cfg.threads, log=lambda _: None)
        result[label] = {"steps": s["steps"], "train_seconds": s["seconds"], "fve_a": s["heldout"].get("fve_a"),
                         "fve_b": s["heldout"].get("fve_b")}
        ctx.log(f"  crosscoder {label}: {s['steps']} steps in {s['seconds']:.1f} s, held-out FVE "
                f"{s['heldout'].get('fve_a', float('nan')):.3f} / {s['heldout'].get('fve_b', float('nan')):.3f}")
    return result


def stage_compare(ctx: Context) -> dict:
    from ..compare import CompareConfig, compare

    out = {}
    for run in runs(ctx.cfg):
        store_label = RUN_ROLES[run][0]
        ccfg = CompareConfig(align=str(run_dir(ctx.work, "align", run)),
                             crosscoder=str(ctx.work / f"crosscoder-{store_label}"),
                             acts=str(store_dir(ctx.cfg, store_label)), out=str(run_dir(ctx.work, "compare", run)),
                             tokens=ctx.cfg.compare.tokens, split=ctx.cfg.compare.split)
        compare(ccfg)
        out[run] = ccfg.out
    return {"dirs": out}


def stage_report(ctx: Context) -> dict:
    from .report import write

    return {"report": str(write(ctx))}


STAGE_FNS = {"finetune": stage_finetune, "losses": stage_losses, "collect": stage_collect, "saes": stage_saes, "map": stage_map,
             "align": stage_align, "crosscoder": stage_crosscoder, "compare": stage_compare, "answer": stage_answer,
             "report": stage_report}
