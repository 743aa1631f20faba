"""The embedded model zoo: tiny transformers and their sae-lens SAEs, committed in the package.

They make every command runnable on any machine with no download. ``diffkit zoo build``
regenerates them from the fixed-seed recipes in :mod:`diffkit.zoo.recipes`; the files under
``artifacts/`` are that command's output.

| name          | what it is                                                     | d_model |
|---------------|----------------------------------------------------------------|---------|
| ``base``      | trained on English prose (pydoc topics)                        | 128     |
| ``finetuned`` | ``base`` fine-tuned on Python source from the standard library | 128     |
| ``base-seed1``| the ``base`` recipe with another seed: the negative control    | 128     |
| ``wide``      | the ``base`` recipe at a larger width: cross-width diffing     | 192     |

Each model has one SAE (seed 0); ``base`` has a second one trained with seed 1 (``zoo:base@seed1``
as an SAE spec), the control for SAE-training noise with the model held fixed.

The organisms (:data:`ORGANISMS`): fine-tunes of ``base`` with a change known token by token —
``backdoor``, ``facts``, ``null`` (nothing planted), ``cot-steps`` / ``cot-answer`` (the same
arithmetic, with and without the working); ``finetuned`` is the ``code`` organism. base, finetuned
and every organism have an SAE at the last block, ``zoo:NAME/blocks.1`` (``zoo:base@seed1/blocks.1``);
the organisms have only those.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DiffkitError
from .recipes import (BLOCK0_MODELS, EXTRA_SAE_SEEDS, LAST_HOOK, ORGANISM_MODELS, ORGANISMS, RECIPES, SAE_HOOK,
                      sae_plan)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ZOO_MODELS = BLOCK0_MODELS  # the original zoo (SAEs at blocks.0 and the last block)
ALL_MODELS = tuple(RECIPES)  # ... and the organisms


def _check(name: str) -> None:
    if name not in RECIPES:
        raise DiffkitError(f"unknown zoo model {name!r}: choose one of {', '.join(ALL_MODELS)}")


def model_dir(name: str) -> Path:
    """Directory of zoo model ``name`` (a diffkit checkpoint)."""
    _check(name)
    path = ARTIFACTS / name / "model"
    if not path.exists():
        raise DiffkitError(f"zoo model {name!r} is not built ({path} is missing): run `diffkit zoo build`")
    return path


def sae_subdir(seed: int = 0, hook: str = SAE_HOOK) -> str:
    """Name of the directory of an SAE at ``hook`` trained with ``seed`` under its model's artifacts:
    ``sae``, ``sae-seed1`` (blocks.0); ``sae-blocks.1``, ``sae-blocks.1-seed1`` (the last block)."""
    stem = "sae" if hook == SAE_HOOK else f"sae-{hook.removesuffix('.hook_resid_post')}"
    return stem if seed == 0 else f"{stem}-seed{seed}"


def sae_dir(name: str, seed: int = 0, hook: str = SAE_HOOK) -> Path:
    """Directory of zoo model ``name``'s SAE at ``hook`` (``seed`` 0, or an extra seed), in sae-lens's format."""
    _check(name)
    have = [(r.hook, s) for r, s in sae_plan(name)]
    if (hook, seed) not in have:
        shown = ", ".join(f"zoo:{name}{'@seed' + str(s) if s else ''}"
                          f"{'/' + h.removesuffix('.hook_resid_post') if h != SAE_HOOK else ''}" for h, s in have)
        raise DiffkitError(f"zoo model {name!r} has no SAE at {hook} with seed {seed}: it has {shown}")
    path = ARTIFACTS / name / sae_subdir(seed, hook)
    if not path.exists():
        raise DiffkitError(f"the SAE of zoo model {name!r} at {hook} (seed {seed}) is not built ({path} is missing): "
                           "run `diffkit zoo build`")
    return path


def sae_spec_dir(spec: str) -> Path:
    """``zoo:NAME``, ``zoo:NAME@seedN``, ``zoo:NAME/blocks.1`` or ``zoo:NAME@seedN/blocks.1`` (an SAE
    spec) -> that SAE's directory. No block: blocks.0 (the zoo's original SAEs)."""
    rest, _, block = spec.removeprefix("zoo:").partition("/")
    name, _, seed = rest.partition("@")
    if (seed and not (seed.startswith("seed") and seed[4:].isdigit())) or \
            (block and not (block.startswith("blocks.") and block[7:].isdigit())):
        raise DiffkitError(f"SAE spec {spec!r}: write zoo:NAME[@seedN][/blocks.L] (e.g. zoo:base@seed1, "
                           "zoo:backdoor/blocks.1)")
    hook = f"{block}.hook_resid_post" if block else SAE_HOOK
    return sae_dir(name, int(seed[4:]) if seed else 0, hook)


__all__ = ["ARTIFACTS", "ZOO_MODELS", "ALL_MODELS", "ORGANISM_MODELS", "ORGANISMS", "SAE_HOOK", "LAST_HOOK", "RECIPES",
           "EXTRA_SAE_SEEDS", "model_dir", "sae_dir", "sae_spec_dir", "sae_subdir", "sae_plan"]
