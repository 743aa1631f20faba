"""Collectives that are the identity in one process (so the numerical core reads the same under DDP)."""

from __future__ import annotations

import torch


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum / max / min of ``t`` over the processes of a torch.distributed run (identity otherwise)."""
    import torch.distributed as dist

    if world() > 1:
        t = t.clone()
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def global_topk_threshold(score_flat: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local candidates (values, flat indices) that belong to the top ``n_keep`` over *all* processes.

    Each process offers its local top ``n_keep`` (the global top can sit on any one rank); the
    ``n_keep``-th largest of the gathered candidates is the global threshold. With one process this
    is exactly ``topk``.
    """
    import torch.distributed as dist

    n_local = min(n_keep, score_flat.numel())
    vals, idx = torch.topk(score_flat, n_local, sorted=False)
    if world() > 1:
        gathered = [torch.empty_like(vals) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, vals.contiguous())
        allv = torch.cat(gathered)
        thr = torch.topk(allv, min(n_keep, allv.numel()), sorted=False).values.min()
        keep = vals >= thr
        vals, idx = vals[keep], idx[keep]
    return vals, idx
