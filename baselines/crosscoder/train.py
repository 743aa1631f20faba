"""Training loop: store batches in, crosscoder out; checkpoints, resume, DDP, metrics.

One function, :func:`train`, reads everything from a frozen :class:`TrainConfig` (saved as
``train_config.json`` before the first step and never changed). Files in ``out``::

    train_config.json           the TrainConfig (strict JSON: unknown keys are rejected)
    metrics.jsonl               one JSON object per log / eval step
    checkpoint.json             pointer to the last complete checkpoint (written atomically, last)
    checkpoints/step_NNNNNNN/   state.safetensors (weights, Adam moments, latent counters) + state.json
    cfg.json, crosscoder.safetensors   the artifact, written when training ends
    train_summary.json          final held-out figures and timings

Schedules (``T`` = total steps): lr rises linearly over the first ``warmup_frac·T`` steps and
falls linearly to 0 over the last ``decay_frac·T``; the L1 coefficient λ rises linearly over
the first ``l1_warmup_frac·T`` steps. Adam, gradient norm clipped at ``grad_clip``.

Batches come from :meth:`ActivationStore.iter_batches` (epoch ``e`` uses ``seed`` and ``e``);
each epoch has ``n_train // batch_size`` steps, so every step sees fresh rows until the epoch ends.
Under ``torchrun`` each of ``W`` ranks reads batches of ``batch_size / W`` rows, its own share
of the same global order; DistributedDataParallel averages gradients, BatchTopK picks the top
``k·batch_size`` over all ranks, so ``W`` processes compute what one process computes with the
same global batch (when the store fits one shuffle window, the very same rows).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from diffkit.errors import DiffkitError
from diffkit.io import atomic_write_bytes, atomic_write_json, sha256_bytes, write_sealed_json

from .metrics import FveAccumulator
from .prefetch import prefetched
from .model import CrossCoder, CrossCoderConfig, _all_reduce, crosscoder_loss, save, strict_from_dict

TRAIN_CONFIG_FILE = "train_config.json"
POINTER_FILE = "checkpoint.json"
METRICS_FILE = "metrics.jsonl"
# Options that change neither the numbers nor the data order: a resume may change them.
RESUME_FREE = ("device", "compile", "wandb", "log_every", "eval_every", "eval_tokens", "checkpoint_every", "autocast",
               "prefetch")


@dataclass(frozen=True)
class TrainConfig:
    acts: str
    out: str
    arch: str = "batchtopk"
    dict_size: int = 4096
    k: int = 32
    l1: float = 1.0                 # λ (l1 arch)
    lr: float = 5e-4
    batch_size: int = 4096          # global: summed over ranks
    tokens: int = 0                 # training tokens (0: one epoch of the train split)
    seed: int = 0
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    l1_warmup_frac: float = 0.05
    grad_clip: float = 1.0
    dec_init_norm: float = 0.0      # 0: arch default (l1 0.08, batchtopk 0.1; see resolve_config)
    aux_alpha: float = 1 / 32
    k_aux: int = 0                  # 0: D // 2
    dead_after_tokens: int = 0      # 0: tokens // 10, at most 10M (see resolve_config)
    reset_dead_adam: bool = True    # zero a latent's Adam moments when it turns dead (see _reset_adam_rows)
    threshold_beta: float = 0.99    # EMA of the BatchTopK inference threshold...
    threshold_start_frac: float = 0.2  # ...updated from this fraction of the steps on (early scores are off)
    sparse: bool = True             # batchtopk: sparse encoder-backward / decoder path
    eval_tokens: int = 50_000       # held-out tokens per evaluation
    log_every: int = 50
    eval_every: int = 0             # 0: only at the end
    checkpoint_every: int = 500     # steps (0: none)
    device: str = "cpu"
    compile: bool = False
    autocast: bool = True           # bf16 autocast on CUDA (ignored on CPU)
    prefetch: int = 2               # CUDA: batches gathered ahead on a thread (0: off; see .prefetch)
    wandb: str = ""                 # wandb project; "" = off (wandb is imported only when set)

    def __post_init__(self) -> None:
        if self.dict_size <= 0:
            raise DiffkitError(f"--dict-size must be positive, got {self.dict_size}")
        if self.arch == "batchtopk" and not 0 < self.k <= self.dict_size:
            raise DiffkitError(f"--k {self.k} must be between 1 and --dict-size {self.dict_size}")
        if self.batch_size <= 0:
            raise DiffkitError(f"--batch-size must be positive, got {self.batch_size}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise DiffkitError(f"--lr must be positive, got {self.lr}")
        if self.tokens < 0:
            raise DiffkitError(f"--tokens must be positive, got {self.tokens}")
        if self.log_every <= 0:
            raise DiffkitError(f"--log-every must be positive, got {self.log_every}")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


def read_train_config(out: Path) -> TrainConfig:
    from diffkit.io import read_json_object

    raw = read_json_object(out / TRAIN_CONFIG_FILE, "the run directory is damaged: choose another --out")
    return strict_from_dict(TrainConfig, raw, str(out / TRAIN_CONFIG_FILE))


def config_difference(saved: TrainConfig, new: TrainConfig) -> dict[str, tuple]:
    a, b = asdict(saved), asdict(new)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in RESUME_FREE}


def lr_at(cfg: TrainConfig, step: int) -> float:
    T = cfg.steps
    warm = max(1, round(cfg.warmup_frac * T))
    decay = max(1, round(cfg.decay_frac * T))
    scale = min(1.0, (step + 1) / warm)
    if step >= T - decay:
        scale *= (T - step) / decay
    return cfg.lr * scale


def l1_at(cfg: TrainConfig, step: int) -> float:
    return cfg.l1 * min(1.0, (step + 1) / max(1, round(cfg.l1_warmup_frac * cfg.steps)))


class _Step(nn.Module):
    """What DistributedDataParallel wraps: batch in, loss and figures out (tensors only)."""

    def __init__(self, model: CrossCoder, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x_BD: torch.Tensor, l1: torch.Tensor, dead_L: torch.Tensor):
        cfg = self.model.cfg
        out = self.model(x_BD, train=True, sparse=self.cfg.sparse)
        parts = crosscoder_loss(self.model, x_BD, out, l1=l1, dead_L=dead_L if cfg.arch == "batchtopk" else None,
                                aux_alpha=self.cfg.aux_alpha)
        if out.active is not None:
            fired_L = torch.zeros(cfg.dict_size, dtype=torch.bool, device=x_BD.device)
            fired_L[out.active[1][out.active[2] > 0]] = True
            n_active = (out.active[2] > 0).sum()
        else:
            fired_L = (out.f_BL > 0).any(dim=0)
            n_active = (out.f_BL > 0).sum()
        min_kept = out.min_kept_score if out.min_kept_score is not None else x_BD.new_tensor(float("inf"))
        return parts.loss, parts.recon, parts.sparsity, parts.aux, out.x_hat_BD.detach(), fired_L, n_active, min_kept


def _reset_adam_rows(opt: torch.optim.Optimizer, model: CrossCoder, rows_L: torch.Tensor) -> None:
    """Zero the Adam moments of latents ``rows_L`` (their W_enc and W_dec rows and b_enc entries).

    A latent that dies carries the second moment of the reconstruction gradients it received while
    alive; the aux loss's gradient is far smaller (weight 1/32, only the residual), so with
    β₂ = 0.999 its steps stay far below the lr for the rest of a short run and the aux loss
    cannot revive it (zoo pair: aux ratio ‖e−ê‖²/‖e‖² stuck at 1.05, 59% dead; with the reset it
    falls to 0.8 and dead latents come back). Anthropic's resampling resets the moments likewise.
    """
    for p in (model.W_enc_LD, model.b_enc_L, model.W_dec_LD):
        state = opt.state.get(p)
        if state:
            state["exp_avg"][rows_L] = 0
            state["exp_avg_sq"][rows_L] = 0


# -- checkpoints --------------------------------------------------------------------------------
def _state_tensors(model: CrossCoder, opt: torch.optim.Optimizer, since_fired_L: torch.Tensor) -> dict:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = dict(model.named_parameters())
    for name, p in names.items():
        for key, val in opt.state.get(p, {}).items():
            tensors[f"adam.{name}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    tensors["since_fired_L"] = since_fired_L.cpu()
    return tensors


def write_checkpoint(out: Path, step: int, model: CrossCoder, opt: torch.optim.Optimizer,
                     since_fired_L: torch.Tensor, extra: dict) -> None:
    """Write ``checkpoints/step_N`` fully, then repoint ``checkpoint.json`` (atomic), then prune."""
    from safetensors.torch import save as st_save

    root = out / "checkpoints"
    name = f"step_{step:07d}"
    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)
    tmp = root / (name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    data = st_save(_state_tensors(model, opt, since_fired_L))
    atomic_write_bytes(tmp / "state.safetensors", data)
    write_sealed_json(tmp / "state.json", {**extra, "step": step, "state_sha256": sha256_bytes(data)})
    for f in tmp.iterdir():  # durable before the pointer names it
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, folder)
    write_sealed_json(out / POINTER_FILE, {"step": step, "dir": f"checkpoints/{name}"})
    for old in root.iterdir():
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(out: Path) -> tuple[int, dict, dict] | None:
    """The last complete checkpoint named by ``checkpoint.json`` (None: none written yet); a damaged one is a
    one-line DiffkitError (its tensors are checked against the model in :func:`_restore`)."""
    from diffkit.io import load_safetensors, read_json_object, verify_seal, verify_sha256

    pointer = out / POINTER_FILE
    if not pointer.exists():
        return None
    fix = "the checkpoint is damaged: delete checkpoint.json to restart the run from step 0, or choose another --out"
    info = verify_seal(pointer, read_json_object(pointer, fix), fix)
    step, rel = info.get("step"), info.get("dir")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or rel != f"checkpoints/step_{step:07d}":
        raise DiffkitError(f"{pointer} names step {repr(step)[:30]} in {repr(rel)[:60]}: {fix}")
    folder = out / rel
    state = verify_seal(folder / "state.json", read_json_object(folder / "state.json", fix), fix)
    if state.get("step") != step:
        raise DiffkitError(f"{folder / 'state.json'} is of step {repr(state.get('step'))[:30]}, not {step}: {fix}")
    verify_sha256(folder / "state.safetensors", state.get("state_sha256"), fix)
    return step, load_safetensors(folder / "state.safetensors", fix), state


def _restore(model: CrossCoder, opt: torch.optim.Optimizer, tensors: dict, device: torch.device) -> torch.Tensor:
    from diffkit.io import check_tensors

    L = model.cfg.dict_size
    expected = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        expected.update({f"adam.{name}.exp_avg": tuple(p.shape), f"adam.{name}.exp_avg_sq": tuple(p.shape),
                         f"adam.{name}.step": ()})
    since = tensors.get("since_fired_L")
    if since is None or tuple(since.shape) != (L,) or since.dtype != torch.int64:
        raise DiffkitError(f"the checkpoint's since_fired_L is missing or not int64 of shape ({L},): the checkpoint "
                           "is damaged; delete checkpoint.json to restart from step 0, or choose another --out")
    check_tensors({k: v for k, v in tensors.items() if k != "since_fired_L"}, expected, "the checkpoint",
                  "delete checkpoint.json to restart from step 0, or choose another --out")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, p in model.named_parameters():
        state = {key.rsplit(".", 1)[1]: v.to(device) for key, v in tensors.items()
                 if key.startswith(f"adam.{name}.")}
        if state:
            state["step"] = state["step"].cpu()
            opt.state[p] = state
    return tensors["since_fired_L"].to(device)


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: CrossCoder, store, split: str = "heldout", max_tokens: int = 50_000, batch_size: int = 4096,
             device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1) -> dict:
    """FVE per source (formula in :mod:`.metrics`), L0 and latents that fired, on ``split``.

    Uses the inference encoding (learned threshold for batchtopk). Normalized units; under DDP
    each rank evaluates its share and the sums are all-reduced.
    """
    acc = FveAccumulator(model.cfg.d_in)
    fired_L = torch.zeros(model.cfg.dict_size, dtype=torch.bool, device=device)
    it = store.iter_batches(batch_size, split=split, shuffle=False, drop_last=False, rank=rank, world_size=world_size)
    for xs in islice(it, max(1, -(-max_tokens // (batch_size * world_size)))):
        x_BD = torch.cat(xs, dim=1).to(device)
        out = model(x_BD, train=False)
        acc.update(model.split(x_BD), model.split(out.x_hat_BD), float((out.f_BL > 0).sum()))
        fired_L |= (out.f_BL > 0).any(dim=0)
    acc.load_tensor(_all_reduce(acc.as_tensor()))
    fired_L = _all_reduce(fired_L.to(torch.int32), "max").bool()
    fves = acc.fve()
    return {"tokens": acc.n, **{f"fve_{s}": v for s, v in zip(model.cfg.sources, fves)}, "l0": acc.l0(),
            "fired_frac": float(fired_L.float().mean())}


def epoch_batches(store, cfg: TrainConfig, step: int, rank: int = 0, world: int = 1):
    """The batches (a, b) of this rank from global ``step`` to the end of its epoch.

    Epoch ``e = step // S`` (``S = n_train // batch_size`` steps) is ``store.iter_batches`` with seed
    ``cfg.seed`` and epoch ``e``: every row at most once per epoch, ranks disjoint; a resumed run
    skips the ``step % S`` batches it has already used.
    """
    steps_per_epoch = store.n_tokens("train") // cfg.batch_size
    epoch, pos = divmod(step, steps_per_epoch)
    batches = store.iter_batches(cfg.batch_size // world, split="train", shuffle=True, seed=cfg.seed, epoch=epoch,
                                 rank=rank, world_size=world)
    return islice(batches, pos, steps_per_epoch)


# -- the loop -----------------------------------------------------------------------------------
def _dist_setup(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffkitError(f"--device {cfg.device} asked for, but this machine has no CUDA device: use --device cpu")
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def resolve_config(cfg: TrainConfig, store) -> TrainConfig:
    """Fill the defaults that depend on the store (tokens, decoder init norm, dead-latent window)."""
    if cfg.tokens == 0:
        cfg = replace(cfg, tokens=store.n_tokens("train"))
    if cfg.dec_init_norm == 0:
        # Small, as Anthropic's recipe: a block that training never uses stays near 0 instead of keeping a
        # random direction of norm ~1 (on the zoo pair, init 1.0 left the median decoder cosine between
        # the two blocks at 0.21 and every relative norm within 0.02 of its init; 0.1 gave 0.83).
        cfg = replace(cfg, dec_init_norm=0.08 if cfg.arch == "l1" else 0.1)
    if cfg.dead_after_tokens == 0:
        # Proportionate to the run (Minder et al.: 10M tokens of runs far longer). A window longer than the
        # run (the old fixed 1M on a 600k-token run) means the aux loss never applies; on the zoo pair
        # (600k tokens, batch 2048) 50k-200k windows with Adam resets left 37-40% dead vs 59-66% without.
        cfg = replace(cfg, dead_after_tokens=min(10_000_000, max(cfg.batch_size, cfg.tokens // 10)))
    return cfg


def model_config(cfg: TrainConfig, store) -> CrossCoderConfig:
    from diffkit.store_format import SOURCES

    return CrossCoderConfig(d_in=tuple(store.d_model(s) for s in SOURCES), dict_size=cfg.dict_size, arch=cfg.arch,
                            k=cfg.k, sources=SOURCES, hooks=tuple(store.hook(s) for s in SOURCES),
                            scale=tuple(store.scale(s) for s in SOURCES), dec_init_norm=cfg.dec_init_norm,
                            k_aux=cfg.k_aux)


def open_store(path: str):
    from diffkit.activations import ActivationStore

    store = ActivationStore.open(path)
    return store


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, threads: int | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Train a crosscoder as ``cfg`` says; return the final summary (also in ``train_summary.json``)."""
    from diffkit.progress import tqdm

    if threads:
        torch.set_num_threads(threads)
    store = open_store(cfg.acts)
    cfg = resolve_config(cfg, store)
    rank, world, device = _dist_setup(cfg)
    out = Path(cfg.out)
    if cfg.batch_size % world:
        raise DiffkitError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    steps_per_epoch = store.n_tokens("train") // cfg.batch_size
    if steps_per_epoch == 0:
        raise DiffkitError(f"the store's train split has {store.n_tokens('train'):,} tokens, fewer than one batch of "
                           f"{cfg.batch_size}: lower --batch-size or collect more tokens")
    if cfg.steps == 0:
        raise DiffkitError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    mcfg = model_config(cfg, store)
    start = _prepare_out(out, cfg, resume, rank)
    model = CrossCoder(mcfg, seed=cfg.seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: one kernel, ~7x less time than foreach on CPU
    since_fired_L = torch.zeros(cfg.dict_size, dtype=torch.int64, device=device)
    step = 0
    if start is not None:
        step, tensors, _ = start
        since_fired_L = _restore(model, opt, tensors, device)
        if rank == 0:
            log(f"resuming {out} from the checkpoint at step {step:,} of {cfg.steps:,}")
    log_figs: dict = {}
    if resume and rank == 0:
        log_figs = _truncate_metrics(out / METRICS_FILE, step, final=step >= cfg.steps)
    wrapped: nn.Module = _Step(model, cfg)
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(wrapped, broadcast_buffers=False,
                                                      device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = torch.compile(wrapped) if cfg.compile else wrapped
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cfg.autocast and device.type == "cuda")
    wandb_run = _wandb(cfg) if cfg.wandb and rank == 0 else None
    metrics_fh = open(out / METRICS_FILE, "a") if rank == 0 else None
    local_batch = cfg.batch_size // world
    bar = tqdm(total=cfg.steps, initial=step, unit="step", desc=f"crosscoder {cfg.arch}",
               disable=not progress or rank != 0)
    t0, tokens_t0, last_ckpt = time.time(), step * cfg.batch_size, step if start else None
    try:
        while step < cfg.steps:
            for x_BD in prefetched(epoch_batches(store, cfg, step, rank, world), device, cfg.prefetch):
                _check_finite_batch(x_BD, mcfg, step, out, last_ckpt)
                if step == 0 and start is None:  # b_dec starts at the (global) mean of the first batch
                    with torch.no_grad():
                        model.b_dec_D.copy_(_all_reduce(x_BD.mean(dim=0)) / world)
                lr = lr_at(cfg, step)
                for group in opt.param_groups:
                    group["lr"] = lr
                lam = l1_at(cfg, step)
                dead_L = since_fired_L >= cfg.dead_after_tokens
                if cfg.reset_dead_adam and mcfg.arch == "batchtopk":
                    newly_dead = dead_L & (since_fired_L < cfg.dead_after_tokens + cfg.batch_size)
                    if bool(newly_dead.any()):
                        _reset_adam_rows(opt, model, newly_dead)
                with autocast:
                    loss, recon, sparsity, aux, x_hat_BD, fired_L, n_active, min_kept = step_fn(
                        x_BD, torch.tensor(lam, device=device), dead_L)
                if not torch.isfinite(loss):
                    raise DiffkitError(f"the loss became non-finite at step {step}: training stopped; "
                                       f"{_kept(out, last_ckpt)}; lower --lr and run again")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                with torch.no_grad():
                    fired_L = _all_reduce(fired_L.to(torch.int32), "max").bool()
                    since_fired_L += cfg.batch_size
                    since_fired_L[fired_L] = 0
                    if (mcfg.arch == "batchtopk" and step >= cfg.threshold_start_frac * cfg.steps
                            and math.isfinite(float(min_kept))):
                        thr = model.threshold
                        thr.copy_(min_kept if thr < 0 else cfg.threshold_beta * thr + (1 - cfg.threshold_beta) * min_kept)
                step += 1
                bar.update(1)
                if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                    xs_m, xh_m = model.split(x_BD), model.split(x_hat_BD.float())
                    acc = FveAccumulator(mcfg.d_in)
                    acc.update(xs_m, xh_m, float(n_active))
                    elapsed = time.time() - t0
                    log_figs = {"step": step, "split": "train", "tokens": step * cfg.batch_size,
                                "loss": float(loss.detach()), "recon": float(recon.detach()), "sparsity": float(sparsity),
                                "aux": float(aux.detach()), **{f"fve_{s}": v for s, v in zip(mcfg.sources, acc.fve())},
                                "l0": acc.l0(), "dead_frac": float(dead_L.float().mean()), "lr": lr, "l1": lam,
                                "grad_norm": float(grad_norm), "threshold": float(model.threshold),
                                "elapsed_s": elapsed,
                                "tokens_per_s": (step * cfg.batch_size - tokens_t0) / max(elapsed, 1e-9)}
                    _emit(metrics_fh, wandb_run, log_figs)
                    bar.set_postfix_str(" ".join(f"{k}={log_figs[k]:.3g}" for k in
                                                 ("loss", *[f"fve_{s}" for s in mcfg.sources], "l0", "dead_frac")))
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    figs = evaluate(model, store, "heldout", cfg.eval_tokens, local_batch, device, rank, world)
                    if rank == 0:
                        _emit(metrics_fh, wandb_run, {"step": step, "split": "heldout", **figs})
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    if rank == 0:
                        write_checkpoint(out, step, model, opt, since_fired_L, {"config": asdict(cfg)})
                    last_ckpt = step
                if step >= cfg.steps:
                    break
    finally:
        bar.close()
        if metrics_fh:
            metrics_fh.close()
    final = evaluate(model, store, "heldout", cfg.eval_tokens, local_batch, device, rank, world) \
        if store.n_tokens("heldout") else {}
    summary = {"steps": step, "tokens": step * cfg.batch_size, "seconds": time.time() - t0, "world_size": world,
               "heldout": final, "last_train_log": log_figs}
    if rank == 0:
        with open(out / METRICS_FILE, "a") as fh:
            fh.write(json.dumps({"step": step, "split": "heldout", **final}) + "\n")
        save(model.cpu(), out, extra={"store": str(cfg.acts), "train_config": TRAIN_CONFIG_FILE, "steps": step})
        model.to(device)
        write_checkpoint(out, step, model, opt, since_fired_L, {"config": asdict(cfg)})
        atomic_write_json(out / "train_summary.json", summary)
        if wandb_run is not None:
            wandb_run.log({f"final/{k}": v for k, v in final.items()})
            wandb_run.finish()
    return summary


def _prepare_out(out: Path, cfg: TrainConfig, resume: bool, rank: int):
    """Check ``out`` against --resume; save the config on a fresh start; return the checkpoint to load."""
    saved_path = out / TRAIN_CONFIG_FILE
    if resume and not saved_path.exists() and out.is_dir() and all(p.name.endswith(".tmp") for p in out.iterdir()):
        for path in out.iterdir():  # killed before it saved its config: nothing to keep, start afresh
            path.unlink(missing_ok=True)
    if resume and not out.exists():
        raise DiffkitError(f"cannot resume: {out} has no {TRAIN_CONFIG_FILE} (it does not exist); drop --resume")
    if resume and any(out.iterdir()):  # an empty folder: killed before it saved its config, start afresh
        if not saved_path.exists():
            raise DiffkitError(f"cannot resume: {out} has no {TRAIN_CONFIG_FILE}; drop --resume")
        diff = config_difference(read_train_config(out), cfg)
        if diff:
            shown = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise DiffkitError(f"cannot resume {out}: the options differ from the saved run ({shown}); repeat its "
                               "options or choose another --out")
        return read_checkpoint(out)
    if out.exists() and any(out.iterdir()):
        raise DiffkitError(f"--out {out} already exists and is not empty: pass --resume to continue it, or choose "
                           "another --out")
    _barrier()  # every rank has checked before rank 0 writes
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(saved_path, asdict(cfg))
    _barrier()
    return None


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _kept(out: Path, last_ckpt: int | None) -> str:
    if last_ckpt is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {last_ckpt:,}) is kept in {out / 'checkpoints'}"


def _check_finite_batch(x_BD: torch.Tensor, mcfg: CrossCoderConfig, step: int, out: Path, last_ckpt) -> None:
    if bool(torch.isfinite(x_BD).all()):
        return
    bad = [s for s, part in zip(mcfg.sources, torch.split(x_BD, list(mcfg.d_in), dim=1))
           if not bool(torch.isfinite(part).all())]
    raise DiffkitError(f"non-finite activations (NaN/inf) of source {', '.join(bad)} in the batch of step {step}: "
                       f"training stopped; {_kept(out, last_ckpt)}; check the store with `diffkit store verify`")


def _emit(fh, wandb_run, figs: dict) -> None:
    if fh is not None:
        fh.write(json.dumps(figs) + "\n")
        fh.flush()
    if wandb_run is not None:
        wandb_run.log({f"{figs['split']}/{k}": v for k, v in figs.items() if k not in ("split", "step")},
                      step=figs["step"])


def _truncate_metrics(path: Path, step: int, final: bool = False) -> dict:
    """Drop log lines a killed run wrote after its last checkpoint (they are recomputed); return the last
    train line kept (the summary's ``last_train_log`` when the resumed run has no step left to log).

    ``final``: the checkpoint is the last step's, written after the final held-out line, which the resumed
    run writes again (the soak run found it twice, and an empty ``last_train_log``, after a kill there).
    """
    if not path.exists():
        return {}
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            keep.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by the kill (or damage): the lines after the checkpoint are recomputed anyway
    keep = [r for r in keep if isinstance(r, dict) and isinstance(r.get("step"), int) and "split" in r]
    keep = [r for r in keep if r["step"] < step or (r["step"] == step and not (final and r["split"] == "heldout"))]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
    return next((r for r in reversed(keep) if r["split"] == "train"), {})


def _wandb(cfg: TrainConfig):
    try:
        import wandb
    except ImportError:
        raise DiffkitError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=cfg.wandb, config=asdict(cfg), dir=cfg.out)
