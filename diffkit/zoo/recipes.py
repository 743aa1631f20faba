"""Fixed-seed recipes for the zoo (pure data: no torch import)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRecipe:
    """How one zoo transformer is trained. ``init_from`` names a zoo model to fine-tune."""

    name: str
    description: str
    corpus: str
    steps: int
    seed: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    batch_size: int = 32
    init_from: str | None = None


@dataclass(frozen=True)
class SAERecipe:
    """How each zoo model's SAE is trained with sae-lens's own trainer (TopK, raw activations)."""

    hook: str = "blocks.0.hook_resid_post"
    corpus: str = "mixed"
    d_sae: int = 1024
    # k=16 at lr 4e-4 left over half the latents dead within 800 steps; k=24 at lr 3e-3 leaves
    # ~2% dead at held-out FVU ~0.09 (measured on zoo:base, 2 cores, ~25 s per SAE).
    k: int = 24
    tokens: int = 400_000
    steps: int = 800
    batch_size: int = 1024
    lr: float = 3e-3
    seed: int = 0


SAE_HOOK = SAERecipe.hook
SAE_RECIPE = SAERecipe()
# Extra SAEs on the same model with other seeds: the noise floor of comparing two independently
# trained SAEs (Paulo & Belrose 2025), with the model itself held fixed.
EXTRA_SAE_SEEDS: dict[str, tuple[int, ...]] = {"base": (1,)}

RECIPES: dict[str, ModelRecipe] = {r.name: r for r in (
    ModelRecipe("base", "trained on English prose (pydoc topics)", corpus="prose", steps=1500, seed=0),
    ModelRecipe("finetuned", "base fine-tuned on Python standard-library source", corpus="code", steps=400,
                seed=0, lr=5e-4, warmup_steps=20, init_from="base"),
    ModelRecipe("base-seed1", "the base recipe with seed 1 (negative control)", corpus="prose", steps=1500,
                seed=1),
    ModelRecipe("wide", "the base recipe at d_model 192 (cross-width diffing)", corpus="prose", steps=1500,
                seed=0, d_model=192, n_heads=6, d_mlp=768),
)}
