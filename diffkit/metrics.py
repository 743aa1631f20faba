"""Generic metrics shared by diffkit's stages, each with its formula stated once, here.

Shape letters: ``N`` tokens, ``D`` a width. Everything is numpy float64 unless said otherwise.

FVE / FVU (the convention used everywhere in diffkit)
    FVU = Σ_t ||y_t − ŷ_t||² / Σ_t ||y_t − ȳ||²     (ȳ: mean of y over the *evaluated* tokens)
    FVE = 1 − FVU                                    (= R², "coefficient of determination", pooled)
    Per output dimension j: FVE_j = 1 − Σ_t (y_tj − ŷ_tj)² / Σ_t (y_tj − ȳ_j)².
    The pooled FVE is *not* the mean of the FVE_j: it weights each dimension by its variance. Other
    conventions in the wild (mean of FVE_j, 1 − MSE/Var with a train-set mean, FVE on normalized
    activations) give different numbers; say which one you compare against.

AUROC
    Probability that a random positive scores above a random negative (ties count half); the
    Mann–Whitney U statistic divided by n_pos · n_neg.

Robust scale
    The median of |x| over the finite entries (the statistic a single outlier cannot move), used
    to put two SAEs' encoder norms on one scale instead of dividing by each SAE's maximum (one
    outlier feature rescaled everything in the first training-free diff).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ErrorSums:
    """Streaming sums for FVE: residual and total sums of squares per output dimension."""

    sse: np.ndarray  # (D,) Σ_t (y_tj − ŷ_tj)²
    sy: np.ndarray   # (D,) Σ_t y_tj
    syy: np.ndarray  # (D,) Σ_t y_tj²
    n: int

    @classmethod
    def zeros(cls, d: int) -> "ErrorSums":
        return cls(np.zeros(d), np.zeros(d), np.zeros(d), 0)

    def add(self, y: np.ndarray, y_hat: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64)
        self.sse += ((y - y_hat) ** 2).sum(0)
        self.sy += y.sum(0)
        self.syy += (y ** 2).sum(0)
        self.n += len(y)

    def sst(self) -> np.ndarray:
        """Σ_t (y_tj − ȳ_j)² per dimension (from the raw sums; float64 keeps it accurate here)."""
        if self.n == 0:
            return np.zeros_like(self.sy)
        return np.maximum(self.syy - self.sy ** 2 / self.n, 0.0)

    def fve(self) -> float:
        """Pooled FVE = 1 − Σ_j SSE_j / Σ_j SST_j (NaN without tokens)."""
        sst = self.sst().sum()
        return float(1.0 - self.sse.sum() / sst) if self.n and sst > 0 else float("nan")

    def fve_per_dim(self) -> np.ndarray:
        """FVE_j = 1 − SSE_j / SST_j (NaN for a constant dimension)."""
        sst = self.sst()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(sst > 0, 1.0 - self.sse / np.where(sst > 0, sst, 1.0), np.nan)


def fve(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Pooled FVE of a prediction (see the module docstring for the formula)."""
    sums = ErrorSums.zeros(np.asarray(y).shape[1])
    sums.add(y, y_hat)
    return sums.fve()


def fvu(y: np.ndarray, y_hat: np.ndarray) -> float:
    """FVU = 1 − FVE."""
    return 1.0 - fve(y, y_hat)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half)."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def robust_scale(x: np.ndarray) -> float:
    """Median of |x| over finite entries (1.0 when there are none or it is 0, so division is safe)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    x = x[np.isfinite(x)]
    med = float(np.median(x)) if x.size else 0.0
    return med if med > 0 else 1.0


def log_ratio(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """log((a + eps) / (b + eps)): a symmetric, scale-free difference of two non-negative quantities."""
    return np.log((np.asarray(a, np.float64) + eps) / (np.asarray(b, np.float64) + eps))
