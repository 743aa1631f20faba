"""The training steps of the smollm2 recipe: fine-tune, held-out loss, and an SAE per model.

The fine-tune runs on the Hugging Face ``LlamaForCausalLM`` (the same weights TransformerLens
loads from the directory it saves), so the fine-tuned model is a plain HF directory that
:func:`diffkit.models.load_model` reads like any other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..corpora import token_sequences
from .smollm2_config import Smollm2Config


def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    from ..tokenizer import HFTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(model_dir), name=str(model_dir))


def sequences(model_dir: Path, corpus: str, split: str, ctx: int, limit: int, seed: int = 0) -> tuple[Any, Any]:
    """(ids, lengths) int64 tensors: the first ``limit`` rows (BOS first) of a corpus split."""
    import torch

    tok = hf_tokenizer(model_dir)
    ids, lengths = [], []
    for seq in token_sequences(corpus, tok, ctx, split=split, seed=seed):
        ids.append(seq.ids)
        lengths.append(seq.length)
        if len(ids) >= limit:
            break
    return torch.from_numpy(np.stack(ids)), torch.as_tensor(lengths)


def lm_loss(model: Any, ids: Any, lengths: Any) -> Any:
    """Mean next-token cross-entropy (nats/token) over real targets (padding masked) of an HF causal LM."""
    import torch
    import torch.nn.functional as F

    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None].to(ids.device)
    logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]
    target_mask = mask[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none")
    return (loss * target_mask.reshape(-1)).sum() / target_mask.sum()


def heldout_losses(model_dir: Path, base_dir: Path, cfg: Smollm2Config) -> dict[str, float]:
    """Held-out loss of the HF model at ``model_dir`` on prose and on code (the corpora's held-out documents)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(cfg.device).eval()
    out = {}
    for domain in ("prose", "code"):
        ids, lengths = sequences(base_dir, domain, "heldout", cfg.eval_ctx, cfg.eval_seqs, seed=cfg.seed)
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(ids), 8):
                ids_b, len_b = ids[start:start + 8].to(cfg.device), lengths[start:start + 8]
                n = int((len_b - 1).clamp(min=0).sum())
                total += float(lm_loss(model, ids_b, len_b)) * n
                count += n
        out[domain] = total / max(count, 1)
    return out


def _lr(step: int, cfg: Smollm2Config) -> float:
    from .build import warmup_cosine_lr  # the zoo recipes' schedule

    return warmup_cosine_lr(step, cfg.ft_lr, cfg.ft_warmup, cfg.ft_steps)


def finetune(base_dir: Path, out_dir: Path, cfg: Smollm2Config,
             progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune a copy of the model at ``base_dir`` on Python source; save it as an HF directory, atomically.

    AdamW, linear warm-up then cosine to 10% of ``ft_lr``, grad-clip 1.0, batches of ``ft_batch``
    rows of ``ft_ctx`` tokens from the code corpus's train split. Returns the training loss per step.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(cfg.device)
    n_rows = max(cfg.ft_steps * cfg.ft_batch, 1)
    ids, lengths = sequences(base_dir, "code", "train", cfg.ft_ctx, n_rows, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(ids), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.ft_lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(cfg.ft_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        rows = order[torch.arange(step * cfg.ft_batch, (step + 1) * cfg.ft_batch) % len(order)]
        loss = lm_loss(model, ids[rows].to(cfg.device), lengths[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return losses


def train_sae(store: Any, side: str, cfg: Smollm2Config, model_name: str, out: Path, quiet: bool = True) -> dict:
    """A TopK SAE on ``side``'s raw train activations, streamed from the store (memory: one batch).

    sae-lens's ``SAETrainer`` receives only an iterator of batches; epochs of the store's train split
    are chained until ``sae_steps`` batches were drawn. Saved in sae-lens's format at ``out``
    (atomically). Returns held-out FVE = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², L0 and the dead fraction.
    """
    import contextlib
    import io

    import torch
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    col = 0 if side == "a" else 1
    torch.manual_seed(cfg.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=store.d_model(side), d_sae=cfg.sae_d, k=cfg.sae_k,
                                                device=cfg.device))

    def batches():
        epoch = 0
        while True:
            for ab in store.iter_batches(cfg.sae_batch, split="train", seed=cfg.seed, epoch=epoch, normalized=False):
                yield ab[col].float().to(cfg.device)
            epoch += 1

    if cfg.sae_b_dec_init == "mean":  # from up to ~50k train tokens (see Smollm2Config.sae_b_dec_init)
        total, count = 0.0, 0
        for ab in store.iter_batches(cfg.sae_batch, split="train", seed=cfg.seed, normalized=False, drop_last=False):
            total = total + ab[col].double().sum(0)
            count += len(ab[col])
            if count >= 50_000:
                break
        with torch.no_grad():
            sae.b_dec.copy_((total / count).float().to(sae.b_dec.device))
    window = max(cfg.sae_steps // 5, 1)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.sae_steps * cfg.sae_batch, train_batch_size_samples=cfg.sae_batch, lr=cfg.sae_lr,
        lr_end=cfg.sae_lr / 10, lr_scheduler_name="cosineannealing", lr_warm_up_steps=max(cfg.sae_steps // 20, 1),
        lr_decay_steps=max(cfg.sae_steps // 5, 1), device=cfg.device, autocast=False, dead_feature_window=window,
        feature_sampling_window=window, n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=10)
    sink = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    with sink:
        sae = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches()).fit()
    sae.cfg.metadata.hook_name = store.hook(side)  # the trainer leaves it unset; align checks it against the store
    sae.cfg.metadata.model_name = model_name
    sae.cfg.metadata.context_size = cfg.ctx
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    sae.save_inference_model(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    sse = sst = 0.0
    l0 = n = 0
    fired = torch.zeros(cfg.sae_d, dtype=torch.bool)
    with torch.no_grad():
        held, total = [], 0
        for ab in store.iter_shards("heldout", normalized=False):  # at most ~200k tokens: bounded memory
            held.append(ab[col].float())
            total += len(held[-1])
            if total >= 200_000:
                break
        x_all = torch.cat(held)[:200_000]
        mean = x_all.mean(0)
        for start in range(0, len(x_all), 4096):
            x = x_all[start:start + 4096].to(cfg.device)
            f = sae.encode(x)
            sse += float(((x - sae.decode(f)) ** 2).sum())
            sst += float(((x - mean.to(cfg.device)) ** 2).sum())
            l0 += int((f > 0).sum())
            n += len(x)
            fired |= (f > 0).any(0).cpu()
    return {"fve": 1 - sse / sst, "l0": l0 / max(n, 1), "dead_fraction": float((~fired).float().mean()),
            "heldout_tokens": n, "train_samples": cfg.sae_steps * cfg.sae_batch,
            "fve_formula": "1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the store's held-out tokens"}
