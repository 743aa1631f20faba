"""Train an SAE with sae-lens's own trainer on activations you have (a store, or any batch stream).

One mechanism for every SAE diffkit trains: ``train_sae`` drives sae-lens's ``SAETrainer`` through
its public seams (``step``, ``maybe_reset_sparsity``, ``save_checkpoint``, ``load_trainer_state``,
``set_final_sae_metadata``, as sae-lens's own ``MultiSAETrainer`` does), so the loss, optimizer, LR
schedule, dead-latent bookkeeping and the saved format are sae-lens's; diffkit adds the data, the
progress bar, atomic output and resume.

Normalization. With ``normalize`` the SAE trains on ``x * scale``, ``scale = sqrt(d_in) / mean ||x||``
(the store's own, from its manifest; sae-lens's ``expected_average_only_in`` convention), through
sae-lens's ``ActivationScaler``; at the end sae-lens folds the scale into the weights
(``W_enc * s``, ``W_dec / s``, ``b_dec / s``), so the saved SAE has ``normalize_activations = "none"``
and reads **raw** activations: exactly what :mod:`diffkit.saes` feeds it (it scales inputs only for
``expected_average_only_in``). The scale used is recorded in ``cfg.json``'s metadata
(``diffkit_normalization``) and in ``sae_train.json``.

Output ``OUT/``: ``cfg.json`` + ``sae_weights.safetensors`` (sae-lens inference format, hook name in
``metadata.hook_name``) and ``sae_train.json`` (this config, the inputs, the metrics). It is
written in a temporary folder and renamed into place, so ``OUT`` either holds a complete SAE or
does not exist. While training, ``OUT.partial/`` holds the config and sae-lens checkpoints
(weights, optimizer, scheduler, sparsity counters) every ``checkpoint_every`` steps; ``resume``
continues from the last one with the same batch stream and gives the uninterrupted run's weights.

Metrics, on held-out activations (the store's ``heldout`` split), in raw space:
``fve = 1 - sum_t ||x_t - x̂_t||² / sum_t ||x_t - mean(x)||²``; ``l0`` = mean number of latents > 0
per token; ``dead_fraction`` = fraction of latents > 0 on no evaluated token.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import DiffkitError
from .io import atomic_write_json, read_json_object

ARCHS = ("topk", "batchtopk", "jumprelu", "standard")
TRAIN_JSON = "sae_train.json"
RUN_JSON = "run.json"
LATEST_JSON = "latest.json"
KIND = "diffkit.SAETraining"
FORMAT_VERSION = 1
FVE_FORMULA = "1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (raw activations, held-out tokens)"


@dataclass(frozen=True)
class SAETrainConfig:
    """Everything that determines the trained SAE (saved in ``sae_train.json``; a resume must match it).

    ``tokens`` is the number of training samples (steps x batch_size; a store smaller than that is
    read for several epochs). The LR schedule is the zoo's known-good one: linear warm-up (at most
    the steps before the decay), constant, then cosine decay to ``lr * lr_end_ratio`` over the last
    ``decay_fraction`` of the steps.
    ``sparsity_coefficient`` is the L1 coefficient (standard) or the L0 coefficient (jumprelu);
    None takes sae-lens's default. ``k`` is used by topk and batchtopk (mean k per token).
    """

    arch: str = "topk"
    d_sae: int = 1024
    k: int = 24
    tokens: int = 819_200
    batch_size: int = 1024
    lr: float = 3e-3
    lr_end_ratio: float = 0.1
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    seed: int = 0
    normalize: bool = True
    sparsity_coefficient: float | None = None
    dead_feature_window: int = 400
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        def need(ok: bool, flag: str, value: Any, what: str) -> None:
            if not ok:
                raise DiffkitError(f"{flag} {value!r} is invalid: {what}")

        need(self.arch in ARCHS, "--arch", self.arch, f"use one of {', '.join(ARCHS)}")
        for flag, v in (("--d-sae", self.d_sae), ("--batch-size", self.batch_size), ("--tokens", self.tokens),
                        ("--checkpoint-every", self.checkpoint_every), ("--dead-feature-window",
                                                                         self.dead_feature_window)):
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, flag, v, "use a positive integer")
        if self.arch in ("topk", "batchtopk"):
            need(isinstance(self.k, int) and 0 < self.k <= self.d_sae, "--k", self.k,
                 f"a {self.arch} SAE needs 1 <= k <= --d-sae ({self.d_sae})")
        need(self.tokens >= self.batch_size, "--tokens", self.tokens,
             f"train on at least one batch (--batch-size {self.batch_size})")
        need(math.isfinite(self.lr) and 0 < self.lr < 1, "--lr", self.lr, "use a learning rate in (0, 1), e.g. 3e-3")
        need(0 < self.lr_end_ratio <= 1, "--lr-end-ratio", self.lr_end_ratio, "use a ratio in (0, 1]")
        need(0 <= self.decay_fraction <= 1, "--decay-fraction", self.decay_fraction, "use a fraction in [0, 1]")
        need(self.warmup_steps >= 0, "--warmup-steps", self.warmup_steps, "use 0 or more")
        if self.sparsity_coefficient is not None:
            need(math.isfinite(self.sparsity_coefficient) and self.sparsity_coefficient >= 0, "--sparsity-coefficient",
                 self.sparsity_coefficient, "use a non-negative number")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @classmethod
    def from_dict(cls, data: dict) -> "SAETrainConfig":
        """Strict: an unknown key is an error naming it."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DiffkitError(f"unknown SAE training option(s) {', '.join(unknown)}: known are {', '.join(sorted(names))}")
        return cls(**data)


def build_training_sae(cfg: SAETrainConfig, d_in: int, device: str = "cpu") -> Any:
    """The sae-lens training SAE of ``cfg.arch`` (weights from ``torch.manual_seed(cfg.seed)``)."""
    import torch
    import sae_lens as sl

    common = dict(d_in=d_in, d_sae=cfg.d_sae, device=device)
    coef = cfg.sparsity_coefficient
    if cfg.arch == "topk":
        scfg = sl.TopKTrainingSAEConfig(**common, k=cfg.k)
    elif cfg.arch == "batchtopk":
        scfg = sl.BatchTopKTrainingSAEConfig(**common, k=float(cfg.k))
    elif cfg.arch == "jumprelu":
        scfg = sl.JumpReLUTrainingSAEConfig(**common, **({} if coef is None else {"l0_coefficient": coef}))
    else:
        scfg = sl.StandardTrainingSAEConfig(**common, **({} if coef is None else {"l1_coefficient": coef}))
    torch.manual_seed(cfg.seed)
    cls = {"topk": sl.TopKTrainingSAE, "batchtopk": sl.BatchTopKTrainingSAE, "jumprelu": sl.JumpReLUTrainingSAE,
           "standard": sl.StandardTrainingSAE}[cfg.arch]
    return cls(scfg)


def _trainer_config(cfg: SAETrainConfig, device: str) -> Any:
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig

    # lr / (1 / ratio): for ratio 0.1 exactly the zoo's lr / 10 (lr * 0.1 differs in the last bit)

    return SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_end=cfg.lr / (1 / cfg.lr_end_ratio), lr_scheduler_name="cosineannealing",
        # at least one step between warm-up and decay: sae-lens's cosine phase divides by its length
        lr_warm_up_steps=min(cfg.warmup_steps, max(0, cfg.steps - int(cfg.steps * cfg.decay_fraction) - 1)),
        lr_decay_steps=int(cfg.steps * cfg.decay_fraction), n_restart_cycles=1, adam_beta1=0.9, adam_beta2=0.999,
        device=device, autocast=False, dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.dead_feature_window, n_checkpoints=0, checkpoint_path=None,
        save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=10)


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _run_record(cfg: SAETrainConfig, d_in: int, hook_name: str, scale: float | None, inputs: dict) -> dict:
    return {"kind": KIND, "format_version": FORMAT_VERSION, "config": asdict(cfg), "d_in": d_in,
            "hook_name": hook_name, "scale": scale, "inputs": inputs}


def _differences(saved: dict, run: dict) -> list[str]:
    """Names whose saved value differs from this run's (``checkpoint_every`` does not change the result)."""
    old_cfg = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    diff = [k for k in run if k != "config" and saved.get(k) != run[k]]
    return diff + [k for k in run["config"] if k != "checkpoint_every" and old_cfg.get(k) != run["config"][k]]


def _prepare(out: Path, run: dict, resume: bool, overwrite: bool) -> tuple[int, Path | None, float] | dict:
    """Decide how to start. Returns the finished result (nothing to do), or (steps done, checkpoint dir,
    seconds spent before)."""
    if resume and overwrite:
        raise DiffkitError("--resume and --overwrite contradict each other: pass one of them")
    part = partial_dir(out)
    if out.exists():
        done = out / TRAIN_JSON
        if not out.is_dir() or not done.exists():
            raise DiffkitError(f"--out {out} exists and is not an SAE trained by diffkit: choose another --out")
        saved = read_json_object(done, "the SAE directory is damaged: train it again with --overwrite")
        if not overwrite:
            diff = _differences(saved, run)
            if resume and not diff:
                return saved
            why = f"with other {', '.join(diff)}" if diff else "with these options already"
            raise DiffkitError(f"--out {out} holds an SAE trained {why}: pass --overwrite to train it again"
                               + ("" if diff else ", or --resume to keep it"))
    if part.exists():
        if overwrite or not (part / RUN_JSON).exists():
            shutil.rmtree(part)
        elif not resume:
            raise DiffkitError(f"an interrupted training run left {part}: rerun the same command with --resume to "
                               "continue it, or with --overwrite to start again")
        else:
            saved = read_json_object(part / RUN_JSON, f"delete {part} and start again")
            diff = _differences(saved, run)
            if diff:
                raise DiffkitError(f"cannot resume {part}: {', '.join(diff)} differ from the interrupted run; "
                                   "repeat its options or pass --overwrite")
            if (part / LATEST_JSON).exists():
                latest = read_json_object(part / LATEST_JSON, f"delete {part} and start again")
                steps, name = latest.get("steps"), latest.get("dir")
                if not (isinstance(steps, int) and isinstance(name, str) and (part / name).is_dir()):
                    raise DiffkitError(f"{part / LATEST_JSON} names no usable checkpoint: pass --overwrite to start "
                                       "again")
                return steps, part / name, float(latest.get("seconds", 0.0))
            return 0, None, 0.0
    part.mkdir(parents=True)
    atomic_write_json(part / RUN_JSON, run)
    return 0, None, 0.0


def _checkpoint(trainer: Any, part: Path, steps: int, seconds: float) -> None:
    """sae-lens's checkpoint under a temporary name, renamed, then named in latest.json; older ones removed."""
    name = f"step_{steps:08d}"
    tmp = part / f"{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_checkpoint(checkpoint_name=tmp.name, base_path=part)
    os.replace(tmp, part / name)
    atomic_write_json(part / LATEST_JSON, {"dir": name, "steps": steps, "seconds": round(seconds, 2)})
    for old in part.glob("step_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _umask_modes(folder: Path) -> None:
    """mkdtemp makes a 0700 folder: give it (and its files) the modes a plain mkdir / open would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~mask)


def evaluate_sae(sae: Any, batches: Iterable[Any], device: str = "cpu") -> dict:
    """Held-out FVE, L0 and dead fraction of an sae-lens SAE on raw activation batches (streamed, float64)."""
    import torch

    sse = sq = 0.0
    total = None
    n = active = 0
    fired = None
    with torch.no_grad():
        for x in batches:
            x = x.to(device=device, dtype=torch.float32)
            feats = sae.encode(x.to(sae.W_enc.dtype))
            recon = sae.decode(feats).float()
            x64 = x.double()
            sse += float(((x - recon).double() ** 2).sum())
            sq += float((x64 ** 2).sum())
            total = x64.sum(0) if total is None else total + x64.sum(0)
            on = feats > 0
            active += int(on.sum())
            fired = on.any(0) if fired is None else fired | on.any(0)
            n += len(x)
    if n == 0:
        return {"fve": None, "l0": None, "dead_fraction": None, "eval_tokens": 0, "fve_formula": FVE_FORMULA}
    sst = sq - float((total ** 2).sum()) / n
    return {"fve": 1 - sse / sst if sst > 0 else float("nan"), "l0": active / n,
            "dead_fraction": float((~fired).float().mean()), "eval_tokens": n, "fve_formula": FVE_FORMULA}


def train_sae(batches: Iterator[Any] | Callable[[int], Iterator[Any]], d_in: int, cfg: SAETrainConfig, out: Path,
              hook_name: str, *, scale: float | None = None, heldout: Callable[[], Iterable[Any]] | None = None,
              metadata: dict | None = None, inputs: dict | None = None, resume: bool = False,
              overwrite: bool = False, device: str = "cpu", progress: bool = True,
              log: Callable[[str], None] = lambda _: None) -> dict:
    """Train ``cfg.arch`` on raw activation ``batches`` (each (batch_size, d_in)) and save it at ``out``.

    ``batches``: an iterator, or a function ``start_step -> iterator`` (used on resume so a stream can
    skip cheaply; an iterator is advanced past the consumed batches instead). ``scale`` is
    ``sqrt(d_in) / mean ||x||`` of the activations (required with ``cfg.normalize``). ``heldout``
    returns an iterable of raw batches for the metrics. ``metadata`` goes into the SAE's cfg.json
    metadata (e.g. ``model_name``), ``inputs`` into sae_train.json (and must match on resume).
    Returns the ``sae_train.json`` record (config, inputs, ``metrics``, seconds) with the metrics also at
    its top level (``rec["fve"]``, ``rec["l0"]``, ``rec["dead_fraction"]``).
    """
    from .progress import tqdm
    from sae_lens import SAETrainer
    from sae_lens import __version__ as sae_lens_version

    from . import __version__
    from .saes import load_sae

    t0 = time.time()
    out = Path(out)
    if cfg.normalize and (scale is None or not math.isfinite(scale) or scale <= 0):
        raise DiffkitError(f"normalize=True needs the activations' scale sqrt(d)/mean norm, got {scale!r}: pass the "
                           "store's scale or set normalize=False")
    run = _run_record(cfg, d_in, hook_name, scale if cfg.normalize else None, inputs or {})
    state = _prepare(out, run, resume, overwrite)
    if isinstance(state, dict):
        log(f"{out} is already trained with these options; nothing to do")
        return {**state, **state.get("metrics", {})}
    done, ckpt, before = state
    part = partial_dir(out)
    sae = build_training_sae(cfg, d_in, device)
    trainer = SAETrainer(cfg=_trainer_config(cfg, device), sae=sae, data_provider=iter(()))
    if cfg.normalize:
        trainer.activation_scaler.scaling_factor = float(scale)
    if ckpt is not None:
        try:
            trainer.load_trainer_state(ckpt)
            sae.load_weights_from_checkpoint(ckpt)
        except Exception as exc:  # noqa: BLE001 - torch.load / safetensors / state-dict errors come in many types
            from .io import first_line

            raise DiffkitError(f"checkpoint {ckpt} does not load ({first_line(exc)}): pass --overwrite to start "
                               "again") from None
        log(f"resuming {out} at step {done:,} of {cfg.steps:,} from {ckpt}")
    sae.to(device)
    if callable(batches):
        stream = batches(done)
    else:
        stream = batches
        for _ in range(done):
            next(stream)
    bar = tqdm(total=cfg.steps, initial=done, unit="step", desc=f"sae {cfg.arch}", disable=not progress)
    while trainer.n_training_steps < cfg.steps:
        trainer.maybe_reset_sparsity()
        try:
            batch = next(stream)
        except StopIteration:
            raise DiffkitError(f"the activation stream ended after {trainer.n_training_steps} of {cfg.steps} steps: "
                               "pass fewer --tokens or more data") from None
        if batch.shape != (cfg.batch_size, d_in):
            raise DiffkitError(f"activation batch has shape {tuple(batch.shape)}, expected ({cfg.batch_size}, {d_in})")
        output = trainer.step(batch)
        trainer.n_training_steps += 1
        bar.update(1)
        if trainer.n_training_steps % 25 == 0:
            bar.set_postfix(mse=f"{output.losses['mse_loss'].item():.4g}")
        if trainer.n_training_steps % cfg.checkpoint_every == 0 and trainer.n_training_steps < cfg.steps:
            _checkpoint(trainer, part, trainer.n_training_steps, before + time.time() - t0)
    bar.close()
    if trainer.activation_scaler.scaling_factor is not None:  # as SAETrainer.fit: fold the scale into the weights
        sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()
    meta = sae.cfg.metadata
    meta.hook_name = hook_name
    for key, value in (metadata or {}).items():
        setattr(meta, key, value)
    meta.diffkit_normalization = {"scale": scale if cfg.normalize else None, "folded": bool(cfg.normalize),
                                  "reads": "raw activations",
                                  "formula": "trained on x * scale, scale = sqrt(d_in) / mean ||x||; folded into "
                                             "W_enc * scale, W_dec / scale, b_dec / scale"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sae.save_inference_model(str(tmp))
        loaded = load_sae(str(tmp), device=device)  # evaluate what was written, read as align reads it
        metrics = evaluate_sae(loaded.sae, heldout() if heldout is not None else [], device)
        record = {**run, "metrics": metrics, "steps": cfg.steps, "device": device,
                  "seconds": round(before + time.time() - t0, 2), "diffkit_version": __version__,
                  "sae_lens_version": sae_lens_version, "sae_lens_train_window": {
                      "l0": meta.l0, "dead_latents": meta.num_dead_features}}
        atomic_write_json(tmp / TRAIN_JSON, record)
        _umask_modes(tmp)
        if out.exists():  # --overwrite: the old SAE is moved aside only once the new one is complete
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(part, ignore_errors=True)
    return {**record, **metrics}


def store_batch_stream(store: Any, source: str, batch_size: int, seed: int) -> Callable[[int], Iterator[Any]]:
    """``start_step -> iterator`` of raw batches of model ``source`` from the store's shuffled ``train`` split:
    epoch after epoch of ``store.iter_batches(seed=seed, epoch=e)``; whole epochs are skipped without reading."""
    per_epoch = store.n_tokens("train") // batch_size
    if per_epoch == 0:
        raise DiffkitError(f"the store's train split has {store.n_tokens('train'):,} tokens, fewer than one batch "
                           f"({batch_size:,}): lower --batch-size or collect more --tokens")
    index = 0 if source == "a" else 1

    def stream(start: int) -> Iterator[Any]:
        epoch, skip = divmod(start, per_epoch)
        while True:
            for i, pair in enumerate(store.iter_batches(batch_size, split="train", shuffle=True, seed=seed,
                                                        epoch=epoch, normalized=False, drop_last=True)):
                if i >= skip:
                    yield pair[index]
            epoch, skip = epoch + 1, 0

    return stream


def train_sae_from_store(store: Any, source: str, cfg: SAETrainConfig, out: Path, *, resume: bool = False,
                         overwrite: bool = False, device: str = "cpu", threads: int | None = None,
                         progress: bool = True, eval_tokens: int = 200_000,
                         log: Callable[[str], None] = lambda _: None) -> dict:
    """:func:`train_sae` on model ``source`` ("a" or "b") of an ActivationStore, with the store's hook,
    scale and held-out split (its train split when it has no held-out tokens, said in the metrics)."""
    import itertools

    import torch

    if source not in ("a", "b"):
        raise DiffkitError(f"--source {source!r} is invalid: use a or b (the store's model A or B)")
    if threads:
        torch.set_num_threads(threads)
    src = store.manifest["sources"][source]
    split = "heldout" if store.n_tokens("heldout") else "train"
    if split == "train":
        log("note: the store has no held-out tokens; the metrics are on its train split")
    epochs = cfg.steps * cfg.batch_size / max(1, store.n_tokens("train"))
    if epochs > 1:
        log(f"note: {cfg.steps * cfg.batch_size:,} training samples from {store.n_tokens('train'):,} train tokens: "
            f"{epochs:.1f} epochs (reshuffled each); collect more tokens for fewer repeats")

    def heldout() -> Iterator[Any]:
        n_batches = max(1, math.ceil(min(eval_tokens, store.n_tokens(split)) / 4096))
        pairs = store.iter_batches(4096, split=split, shuffle=False, normalized=False, drop_last=False)
        return (pair[0 if source == "a" else 1] for pair in itertools.islice(pairs, n_batches))

    inputs = {"store": str(Path(store.root).resolve()), "source": source, "model": src.get("spec"),
              "store_tokens": store.n_tokens("all"), "eval_split": split}
    record = train_sae(store_batch_stream(store, source, cfg.batch_size, cfg.seed), store.d_model(source), cfg, out,
                       store.hook(source), scale=store.scale(source), heldout=heldout, inputs=inputs,
                       metadata={"model_name": src.get("spec"), "context_size": store.config.ctx,
                                 "prepend_bos": bool(store.manifest.get("has_bos", True))},
                       resume=resume, overwrite=overwrite, device=device, progress=progress, log=log)
    return record
