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
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DiffkitError
from .recipes import RECIPES, SAE_HOOK

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


def sae_dir(name: str) -> Path:
    """Directory of zoo model ``name``'s SAE, in sae-lens's format (cfg.json + sae_weights.safetensors)."""
    _check(name)
    path = ARTIFACTS / name / "sae"
    if not path.exists():
        raise DiffkitError(f"the SAE of zoo model {name!r} is not built ({path} is missing): run `diffkit zoo build`")
    return path


__all__ = ["ARTIFACTS", "ZOO_MODELS", "SAE_HOOK", "RECIPES", "model_dir", "sae_dir"]
