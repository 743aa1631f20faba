"""Reconstruction metrics of the crosscoder: diffkit's FVE (:mod:`diffkit.metrics`), per source, streamed.

FVE is always, per source ``m`` over the evaluated tokens::

    FVE_m = 1 − Σ_t ‖x_m,t − x̂_m,t‖² / Σ_t ‖x_m,t − μ_m‖²,   μ_m = mean_t x_m,t,   FVU_m = 1 − FVE_m

(total variance over all dimensions, not the mean of per-dimension R²; the same in raw and in
normalized units because one scale multiplies both sums). L0 = mean number of non-zero latents per
token. The sums are :class:`diffkit.metrics.ErrorSums`, the ones the linear map is scored with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from diffkit import metrics


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over a batch: 0 for a perfect reconstruction, 1 for the mean."""
    return metrics.fvu(_np(x_BD), _np(x_hat_BD))


def fve(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """``1 − fvu``."""
    return metrics.fve(_np(x_BD), _np(x_hat_BD))


@dataclass
class FveAccumulator:
    """Streaming FVE per source (float64 sums, memory O(D)) and L0; packable for an all-reduce."""

    d_in: tuple[int, ...]
    sums: list[metrics.ErrorSums] = field(default_factory=list)
    l0_sum: float = 0.0

    def __post_init__(self) -> None:
        self.sums = [metrics.ErrorSums.zeros(d) for d in self.d_in]

    @property
    def n(self) -> int:
        return self.sums[0].n

    def update(self, xs: list[torch.Tensor], x_hats: list[torch.Tensor], l0_tokens: float = 0.0) -> None:
        for sums, x, xh in zip(self.sums, xs, x_hats):
            sums.add(_np(x), _np(xh))
        self.l0_sum += l0_tokens

    def as_tensor(self) -> torch.Tensor:
        """All sums in one float64 vector (to all-reduce them across processes)."""
        parts = [np.array([float(self.n), self.l0_sum])]
        for s in self.sums:
            parts += [s.sse, s.sy, s.syy]
        return torch.from_numpy(np.concatenate(parts))

    def load_tensor(self, t: torch.Tensor) -> None:
        values = t.detach().to("cpu", torch.float64).numpy()
        n, self.l0_sum = int(values[0]), float(values[1])
        at = 2
        for m, d in enumerate(self.d_in):
            sse, sy, syy = (values[at + i * d: at + (i + 1) * d].copy() for i in range(3))
            self.sums[m] = metrics.ErrorSums(sse, sy, syy, n)
            at += 3 * d

    def fve(self) -> list[float]:
        return [s.fve() for s in self.sums]

    def l0(self) -> float:
        return self.l0_sum / max(self.n, 1)
