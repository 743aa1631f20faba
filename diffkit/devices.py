"""``--device`` names -> a torch device name (torch imported only when the name needs it).

Its own module so that every command line (diffkit's and the crosscoder baseline's) reads the same
rule without importing the other's CLI.
"""

from __future__ import annotations

from .errors import DiffkitError


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available else cpu; ``cuda*`` is checked to exist; anything else passes through."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DiffkitError(f"--device {name} asked for, but this machine has no CUDA device: use --device cpu")
    return name
