"""Run a model only as far as one hook and return that hook's activations.

Why not ``run_with_cache``: without ``stop_at_layer`` and a names filter it runs every layer and
stores every hook. Here the forward pass stops after the block that holds the hook, and only that
one tensor is kept (the benchmark in ``diffkit bench collect`` measures the difference).
"""

from __future__ import annotations

import re
from typing import Any

from .errors import DiffkitError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def stop_layer(model: Any, hook: str) -> int | None:
    """Layer index at which the forward pass may stop once ``hook`` has fired (None: run to the end)."""
    if hook not in model.hook_dict:
        last = model.cfg.n_layers - 1
        others = [h for h in ("blocks.0.mlp.hook_post", "blocks.0.attn.hook_z", "hook_embed") if h in model.hook_dict]
        raise DiffkitError(f"unknown hook {hook!r} for this {model.cfg.n_layers}-layer model: residual hooks are "
                           f"blocks.N.hook_resid_pre / hook_resid_mid / hook_resid_post with N in 0..{last} "
                           f"(others: {', '.join(others)}; {len(model.hook_dict)} hooks in all)")
    match = _BLOCK.match(hook)
    if match:
        return int(match.group(1)) + 1
    if hook in ("hook_embed", "hook_pos_embed"):
        return 0
    return None


def hook_activations(model: Any, tokens: Any, hook: str) -> Any:
    """Activations at ``hook`` for ``tokens`` (batch, pos) -> (batch, pos, d), under no_grad."""
    import torch

    captured: dict[str, Any] = {}

    def capture(act, hook):  # noqa: ARG001 - TransformerLens calls hooks with (tensor, hook)
        captured["act"] = act.detach()
        return act

    layer = stop_layer(model, hook)
    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, capture)]):
        model(tokens, return_type=None, stop_at_layer=layer)
    if "act" not in captured:
        raise DiffkitError(f"hook {hook!r} did not fire: it is not on the forward path of this model")
    act = captured["act"]
    if act.ndim != 3:
        raise DiffkitError(f"hook {hook!r} gives activations of shape {tuple(act.shape)}: pick a hook with "
                           "one vector per position (e.g. a residual stream hook), not per-head")
    return act
