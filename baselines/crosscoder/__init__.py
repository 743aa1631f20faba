"""Crosscoder baseline (Anthropic 2024; BatchTopK after Minder et al. 2025).

Trains on the same ActivationStore that ``diffkit align`` reads. Modules: :mod:`.model` (the
architectures and their losses), :mod:`.train` (loop, checkpoints, DDP), :mod:`.analysis` (the
LatentTable), :mod:`.metrics`, :mod:`.cli`, :mod:`.bench`. ``load(dir)`` returns a model that
encodes and decodes raw activations. torch is imported only when a function needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load(path: str | Path, device: str = "cpu") -> Any:
    """Load a trained crosscoder (``cfg.json`` + ``crosscoder.safetensors``); see :func:`.model.load`."""
    from .model import load as _load

    return _load(path, device)


__all__ = ["load"]
