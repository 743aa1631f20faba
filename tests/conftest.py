"""Shared fixtures: small real models saved as real checkpoints, and small real stores.

Two CPU-bound torch processes on a 2-core machine slow each other ~10x, so the suite pins torch
to one thread unless told otherwise.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ.get("DIFFKIT_TEST_THREADS", "1")))
    warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")


def make_checkpoint(path: Path, d_model: int = 32, n_layers: int = 2, seed: int = 0, n_ctx: int = 64,
                    nan_byte: int | None = None, massive_byte: int | None = None) -> Path:
    """Save a random-init TransformerLens model as a diffkit checkpoint (real files, real loader).

    ``massive_byte``: that token's embedding is scaled 1000x, a planted "massive activation".
    """
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from diffkit.models import save_checkpoint
    from diffkit.tokenizer import ByteTokenizer

    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=2, d_head=d_model // 2,
                                  d_mlp=4 * d_model, n_ctx=n_ctx, d_vocab=258, act_fn="gelu",
                                  normalization_type="LN", seed=seed)
    model = HookedTransformer(cfg)
    if nan_byte is not None:
        with torch.no_grad():
            model.embed.W_E[nan_byte] = float("nan")
    if massive_byte is not None:
        with torch.no_grad():
            model.embed.W_E[massive_byte] *= 1000.0
    save_checkpoint(model, ByteTokenizer(), path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {"a": str(make_checkpoint(root / "a", d_model=32, seed=0)),
            "b": str(make_checkpoint(root / "b", d_model=48, seed=1)),
            "nan": str(make_checkpoint(root / "nan", d_model=32, seed=2, nan_byte=ord("e")))}


def small_config(models: dict[str, str], **overrides):
    from diffkit.activations import CollectConfig

    options = dict(model_a=models["a"], model_b=models["b"], hook_a="blocks.0.hook_resid_post",
                   hook_b="blocks.1.hook_resid_post", corpus="mixed", tokens=4000, ctx=64, shard_mb=0.15)
    options.update(overrides)
    return CollectConfig(**options)


@pytest.fixture(scope="session")
def small_store(tiny_models, tmp_path_factory):
    """A complete store of 4000 tokens in several shards (models of different widths)."""
    from diffkit.activations import ActivationStore, collect_activations

    out = tmp_path_factory.mktemp("stores") / "small"
    collect_activations(small_config(tiny_models), out, progress=False)
    return ActivationStore.open(out)
