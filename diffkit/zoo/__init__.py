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
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DiffkitError
from .recipes import EXTRA_SAE_SEEDS, RECIPES, SAE_HOOK

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ZOO_MODELS = tuple(RECIPES)


def _check(name: str) -> None:
    if name not in RECIPES:
        raise DiffkitError(f"unknown zoo model {name!r}: choose one of {', '.join(ZOO_MODELS)}")


def model_dir(name: str) -> Path:
    """Directory of zoo model ``name`` (a diffkit checkpoint)."""
    _check(name)
    path = ARTIFACTS / name / "model"
    if not path.exists():
        raise DiffkitError(f"zoo model {name!r} is not built ({path} is missing): run `diffkit zoo build`")
    return path


def sae_subdir(seed: int = 0) -> str:
    """Name of the directory of an SAE trained with ``seed`` under its model's artifacts."""
    return "sae" if seed == 0 else f"sae-seed{seed}"


def sae_dir(name: str, seed: int = 0) -> Path:
    """Directory of zoo model ``name``'s SAE (``seed`` 0, or an extra seed), in sae-lens's format."""
    _check(name)
    seeds = (0, *EXTRA_SAE_SEEDS.get(name, ()))
    if seed not in seeds:
        raise DiffkitError(f"zoo model {name!r} has SAEs with seeds {', '.join(map(str, seeds))}, not {seed}")
    path = ARTIFACTS / name / sae_subdir(seed)
    if not path.exists():
        raise DiffkitError(f"the SAE of zoo model {name!r} (seed {seed}) is not built ({path} is missing): run "
                           "`diffkit zoo build`")
    return path


def sae_spec_dir(spec: str) -> Path:
    """``zoo:NAME`` or ``zoo:NAME@seedN`` (an SAE spec) -> that SAE's directory."""
    name, _, seed = spec.removeprefix("zoo:").partition("@")
    if seed and not (seed.startswith("seed") and seed[4:].isdigit()):
        raise DiffkitError(f"SAE spec {spec!r}: write zoo:NAME or zoo:NAME@seedN (e.g. zoo:base@seed1)")
    return sae_dir(name, int(seed[4:]) if seed else 0)


__all__ = ["ARTIFACTS", "ZOO_MODELS", "SAE_HOOK", "RECIPES", "EXTRA_SAE_SEEDS", "model_dir", "sae_dir", "sae_spec_dir",
           "sae_subdir"]
