"""The store-fed SAE trainer the pipeline calls for ``saes.X = "train"``.

This is the smollm2 recipe's trainer (moved here with the recipe): a stand-in until
``diffkit.sae_train.train_sae_from_store`` (``diffkit sae train``) lands, when the pipeline calls that
and this file goes. It is the only trainer that reads an activation store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .config import SAETrain


def train_sae_from_store(store: Any, side: str, cfg: SAETrain, out: Path, seed: int = 0, device: str = "cpu",
                         model_name: str = "", context_size: int = 128, quiet: bool = True) -> dict:
    """A TopK SAE on ``side``'s raw train activations, streamed from the store (memory: one batch).

    sae-lens's ``SAETrainer`` receives only an iterator of batches; epochs of the store's train split
    are chained until ``steps`` batches were drawn. Saved in sae-lens's format at ``out``
    (atomically). Returns held-out FVE = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², L0 and the dead fraction.
    """
    import contextlib
    import io

    import torch
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    col = 0 if side == "a" else 1
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=store.d_model(side), d_sae=cfg.d_sae, k=cfg.k,
                                                device=device))

    def batches():
        epoch = 0
        while True:
            for ab in store.iter_batches(cfg.batch, split="train", seed=seed, epoch=epoch, normalized=False):
                yield ab[col].float().to(device)
            epoch += 1

    if cfg.b_dec_init == "mean":  # from up to ~50k train tokens (see SAETrain.b_dec_init)
        total, count = 0.0, 0
        for ab in store.iter_batches(cfg.batch, split="train", seed=seed, normalized=False, drop_last=False):
            total = total + ab[col].double().sum(0)
            count += len(ab[col])
            if count >= 50_000:
                break
        with torch.no_grad():
            sae.b_dec.copy_((total / count).float().to(sae.b_dec.device))
    window = max(cfg.steps // 5, 1)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch, train_batch_size_samples=cfg.batch, lr=cfg.lr,
        lr_end=cfg.lr / 10, lr_scheduler_name="cosineannealing", lr_warm_up_steps=max(cfg.steps // 20, 1),
        lr_decay_steps=max(cfg.steps // 5, 1), device=device, autocast=False, dead_feature_window=window,
        feature_sampling_window=window, n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=10)
    sink = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    with sink:
        sae = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches()).fit()
    sae.cfg.metadata.hook_name = store.hook(side)  # the trainer leaves it unset; align checks it against the store
    sae.cfg.metadata.model_name = model_name
    sae.cfg.metadata.context_size = context_size
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    sae.save_inference_model(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    sse = sst = 0.0
    l0 = n = 0
    fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
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
            x = x_all[start:start + 4096].to(device)
            f = sae.encode(x)
            sse += float(((x - sae.decode(f)) ** 2).sum())
            sst += float(((x - mean.to(device)) ** 2).sum())
            l0 += int((f > 0).sum())
            n += len(x)
            fired |= (f > 0).any(0).cpu()
    return {"fve": 1 - sse / sst, "l0": l0 / max(n, 1), "dead_fraction": float((~fired).float().mean()),
            "heldout_tokens": n, "train_samples": cfg.steps * cfg.batch,
            "fve_formula": "1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the store's held-out tokens"}
