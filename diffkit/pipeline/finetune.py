"""The pipeline's ``finetune`` stage (``models.b = "finetune"``): model A fine-tuned on a corpus.

The fine-tune runs on the Hugging Face causal LM (the same weights TransformerLens loads from the
directory it saves), so the fine-tuned model is a plain HF directory that
:func:`diffkit.models.load_model` reads like any other. Model A must be an HF directory or
``zoo:smollm2`` (the smollm2 recipe, ``configs/smollm2-cpu.toml``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..corpora import token_sequences
from ..errors import DiffkitError
from .config import Finetune


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


def hf_dir(spec: str) -> Path:
    """The Hugging Face directory of model A, which the fine-tune starts from."""
    if spec == "zoo:smollm2":
        from ..zoo import smollm2

        return smollm2.hf_dir()
    if (Path(spec) / "config.json").exists():
        return Path(spec)
    raise DiffkitError(f"models.b = \"finetune\" needs model A as a Hugging Face directory or zoo:smollm2, not {spec!r}")


def finetune(base_dir: Path, out_dir: Path, cfg: Finetune, seed: int = 0, device: str = "cpu",
             progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune a copy of the model at ``base_dir`` on ``cfg.corpus``; save it as an HF directory, atomically.

    AdamW, linear warm-up then cosine to 10% of ``lr``, grad-clip 1.0, batches of ``batch`` rows of
    ``ctx`` tokens from the corpus's train split. Returns the training loss per step.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..zoo.build import warmup_cosine_lr  # the zoo recipes' schedule

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    n_rows = max(cfg.steps * cfg.batch, 1)
    ids, lengths = sequences(base_dir, cfg.corpus, "train", cfg.ctx, n_rows, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps)
        rows = order[torch.arange(step * cfg.batch, (step + 1) * cfg.batch) % len(order)]
        loss = lm_loss(model, ids[rows].to(device), lengths[rows])
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
