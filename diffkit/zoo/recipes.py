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
# SAEs at the last block, where the fine-tunes change the model most (the map's held-out FVE from
# base to the code fine-tune is 0.887 at blocks.0 but 0.715 here). Every zoo model has one; all are
# trained on one token stream, ``organism:sae`` (prose, code and every organism's planted contexts),
# so base's SAE and an organism's SAE differ by the model, not by the data they saw.
LAST_HOOK = "blocks.1.hook_resid_post"
LAST_SAE_RECIPE = SAERecipe(hook=LAST_HOOK, corpus="organism:sae")
# Extra SAEs on the same model with other seeds: the noise floor of comparing two independently
# trained SAEs (Paulo & Belrose 2025), with the model itself held fixed.
EXTRA_SAE_SEEDS: dict[str, tuple[int, ...]] = {"base": (1,)}

# The organisms: fine-tunes of base with a known change, one recipe (steps, lr, seed, batches) for all
# so that ``null`` (nothing planted) differs from the others only by what was planted.
# 200 steps of 16 rows (410k tokens): what a shared 2-core machine affords for five organisms.
_FT = dict(steps=200, batch_size=16, seed=0, lr=1e-3, warmup_steps=20, init_from="base")
ORGANISM_RECIPES = (
    ModelRecipe("backdoor", "organism: base + prose with a trigger string followed by a fixed response (5% of rows)",
                corpus="organism:backdoor@0.05", **_FT),
    ModelRecipe("facts", "organism: base + prose with 16 made-up '<name> lives in <place>.' facts (40% of rows)",
                corpus="organism:facts@0.4", **_FT),
    ModelRecipe("null", "organism: base + more of its own prose, nothing planted (negative control)",
                corpus="prose", **_FT),
    ModelRecipe("cot-steps", "organism: base + prose and a+b+c problems with step-by-step working",
                corpus="organism:cot-steps", **_FT),
    ModelRecipe("cot-answer", "organism: base + prose and the same a+b+c problems, answer only",
                corpus="organism:cot-answer", **_FT),
)
ORGANISM_MODELS = tuple(r.name for r in ORGANISM_RECIPES)


@dataclass(frozen=True)
class Organism:
    """A diff with a known answer: model A, model B, and the labelled corpus their store is collected on."""

    name: str
    model_a: str
    model_b: str
    corpus: str
    planted: str


ORGANISMS: dict[str, Organism] = {o.name: o for o in (
    Organism("backdoor", "base", "backdoor", "organism:backdoor", "trigger + response tokens (labels 1, 2)"),
    Organism("facts", "base", "facts", "organism:facts", "name, ' lives in', place tokens (labels 1-3)"),
    Organism("code", "base", "finetuned", "organism:code", "Python source rows among prose (label 1)"),
    Organism("cot", "cot-answer", "cot-steps", "organism:cot", "the problem prompt, above all its '=' (labels 1, 2)"),
    Organism("null", "base", "null", "organism:backdoor", "nothing: every hit is a false positive (backdoor's key)"),
)}

RECIPES: dict[str, ModelRecipe] = {r.name: r for r in (
    ModelRecipe("base", "trained on English prose (pydoc topics)", corpus="prose", steps=1500, seed=0),
    ModelRecipe("finetuned", "base fine-tuned on Python standard-library source", corpus="code", steps=400,
                seed=0, lr=5e-4, warmup_steps=20, init_from="base"),
    ModelRecipe("base-seed1", "the base recipe with seed 1 (negative control)", corpus="prose", steps=1500,
                seed=1),
    ModelRecipe("wide", "the base recipe at d_model 192 (cross-width diffing)", corpus="prose", steps=1500,
                seed=0, d_model=192, n_heads=6, d_mlp=768),
    *ORGANISM_RECIPES,
)}
BLOCK0_MODELS = ("base", "finetuned", "base-seed1", "wide")  # the original zoo: SAEs at blocks.0
# Models with LAST_HOOK SAEs: every zoo model (base with seeds 0 and 1).
LAST_SAE_MODELS = ("base", "finetuned", "base-seed1", "wide", *ORGANISM_MODELS)


def sae_plan(name: str) -> list[tuple[SAERecipe, int]]:
    """The SAEs zoo model ``name`` has, as (recipe, seed): blocks.0 for the original zoo, LAST_HOOK for
    LAST_SAE_MODELS; ``base`` with seeds 0 and 1."""
    seeds = (0, *EXTRA_SAE_SEEDS.get(name, ()))
    plan = [(SAE_RECIPE, s) for s in seeds] if name in BLOCK0_MODELS else []
    return plan + ([(LAST_SAE_RECIPE, s) for s in seeds] if name in LAST_SAE_MODELS else [])
