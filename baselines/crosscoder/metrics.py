"""Reconstruction metrics of the crosscoder, each with its formula (to be merged with diffkit.metrics).

FVE ("fraction of variance explained") here is always, per source ``m`` over the evaluated tokens::

    FVE_m = 1 − Σ_t ‖x_m,t − x̂_m,t‖² / Σ_t ‖x_m,t − μ_m‖²,   μ_m = mean_t x_m,t,   FVU_m = 1 − FVE_m

(total variance over all dimensions, not the mean of per-dimension R²; the same in raw and in
normalized units because one scale multiplies both sums). L0 = mean number of non-zero latents per
token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over a batch: 0 for a perfect reconstruction, 1 for the mean."""
    x = x_BD.double()
    err = (x - x_hat_BD.double()).pow(2).sum()
    var = (x - x.mean(dim=0)).pow(2).sum()
    return float(err / var)


def fve(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """``1 − fvu``."""
    return 1.0 - fvu(x_BD, x_hat_BD)


@dataclass
class FveAccumulator:
    """Streaming FVE per source: float64 sums of ‖x − x̂‖², x and ‖x‖² (one pass, memory O(D))."""

    d_in: tuple[int, ...]
    n: int = 0
    err: list[float] = field(default_factory=list)
    sq: list[float] = field(default_factory=list)
    sums: list[torch.Tensor] = field(default_factory=list)
    l0_sum: float = 0.0

    def __post_init__(self) -> None:
        self.err = [0.0] * len(self.d_in)
        self.sq = [0.0] * len(self.d_in)
        self.sums = [torch.zeros(d, dtype=torch.float64) for d in self.d_in]

    def update(self, xs: list[torch.Tensor], x_hats: list[torch.Tensor], l0_tokens: float = 0.0) -> None:
        for m, (x, xh) in enumerate(zip(xs, x_hats)):
            x = x.double().cpu()
            self.err[m] += float((x - xh.double().cpu()).pow(2).sum())
            self.sq[m] += float(x.pow(2).sum())
            self.sums[m] += x.sum(dim=0)
        self.n += xs[0].shape[0]
        self.l0_sum += l0_tokens

    def as_tensor(self) -> torch.Tensor:
        """All sums in one float64 vector (to all-reduce them across processes)."""
        return torch.cat([torch.tensor([float(self.n), self.l0_sum, *self.err, *self.sq], dtype=torch.float64),
                          *self.sums])

    def load_tensor(self, t: torch.Tensor) -> None:
        M = len(self.d_in)
        self.n, self.l0_sum = int(t[0]), float(t[1])
        self.err = [float(v) for v in t[2:2 + M]]
        self.sq = [float(v) for v in t[2 + M:2 + 2 * M]]
        self.sums = list(torch.split(t[2 + 2 * M:], list(self.d_in)))

    def fve(self) -> list[float]:
        out = []
        for m in range(len(self.d_in)):
            total = self.sq[m] - float(self.sums[m].pow(2).sum()) / max(self.n, 1)
            out.append(1.0 - self.err[m] / total if total > 0 else float("nan"))
        return out

    def l0(self) -> float:
        return self.l0_sum / max(self.n, 1)
