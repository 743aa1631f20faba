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

Representation similarity (rows of ``x`` (N, Dx) and ``y`` (N, Dy) are the same N inputs; both are
centered first; none of these is a fitted map, so evaluate them on held-out inputs)
    CCA         canonical correlations ρ_1 ≥ … ≥ ρ_k, k = min(Dx, Dy): singular values of
                Cxx^{-1/2} Cxy Cyy^{-1/2} (each C regularised by ε·mean diag, ε = 1e-6; clipped to
                [0, 1]); mean CCA = (1/k) Σ ρ_j. Invariant to any invertible linear map of either side:
                1 for identical (or linearly related) x, y; ≈ 0 for independent ones (bias ≈ sqrt(D/N)).
    SVCCA       (Raghu et al. 2017) project each side on its top principal directions that keep
                ``keep`` (0.99) of its variance, then mean CCA of the projections.
    linear CKA  (Kornblith et al. 2019) ‖Yᵀ X‖_F² / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F): 1 for identical x, y;
                invariant to orthogonal transforms and isotropic scaling of either side, *not* to
                general linear maps; ≈ 0 for independent data (bias shrinks as N grows).
    effective dimension of the mappable subspace: #{j : ρ_j ≥ t} (t = 0.5 by default), the number
                of canonical directions one side predicts of the other with correlation ≥ t.
    participation ratio (Σ λ)² / Σ λ² of the covariance eigenvalues λ: the effective number of
                dimensions one space uses (D for isotropic data, 1 for data on a line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

CCA_EPS = 1e-6


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


def _f64(x: Any) -> np.ndarray:
    """A float64 numpy copy of an array or a (CPU or GPU) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _inv_sqrt(c: np.ndarray, eps: float) -> np.ndarray:
    c = c + eps * max(float(np.mean(np.diag(c))), 1e-300) * np.eye(len(c))
    vals, vecs = np.linalg.eigh(c)
    return (vecs / np.sqrt(np.clip(vals, 1e-300, None))) @ vecs.T


def canonical_correlations_cov(cxx: Any, cyy: Any, cxy: Any, eps: float = CCA_EPS) -> np.ndarray:
    """ρ_1 ≥ … ≥ ρ_k (k = min(Dx, Dy)) from centered covariance blocks (module docstring), in [0, 1]."""
    cxx, cyy, cxy = _f64(cxx), _f64(cyy), _f64(cxy)
    rho = np.linalg.svd(_inv_sqrt(cxx, eps) @ cxy @ _inv_sqrt(cyy, eps), compute_uv=False)
    return np.clip(rho[:min(len(cxx), len(cyy))], 0.0, 1.0)


def canonical_correlations(x: Any, y: Any, eps: float = CCA_EPS) -> np.ndarray:
    """Canonical correlations of the rows of ``x`` (N, Dx) and ``y`` (N, Dy), descending."""
    x, y = _f64(x), _f64(y)
    x, y = x - x.mean(0), y - y.mean(0)
    return canonical_correlations_cov(x.T @ x, y.T @ y, x.T @ y, eps)


def mean_cca(cxx: Any, cyy: Any, cxy: Any, eps: float = CCA_EPS) -> float:
    """Mean canonical correlation from centered covariance blocks (arrays or torch tensors)."""
    return float(canonical_correlations_cov(cxx, cyy, cxy, eps).mean())


def cca_of_samples(x: Any, y: Any) -> float:
    """Mean canonical correlation between the rows of ``x`` and ``y`` (samples × features)."""
    return float(canonical_correlations(x, y).mean())


def principal_projection(x: Any, keep: float = 0.99) -> np.ndarray:
    """Centered ``x`` projected on its fewest principal directions that keep ``keep`` of the variance."""
    x = _f64(x)
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s ** 2
    if var.sum() <= 0:
        return x[:, :1] * 0.0
    n = int(np.searchsorted(np.cumsum(var) / var.sum(), keep - 1e-12) + 1)
    return x @ vt[:min(n, len(vt))].T


def svcca(x: Any, y: Any, keep: float = 0.99) -> float:
    """SVCCA: mean CCA of each side's principal projection keeping ``keep`` of its variance."""
    return cca_of_samples(principal_projection(x, keep), principal_projection(y, keep))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA = ‖Yᵀ X‖_F² / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) on centered rows (NaN if a side is constant)."""
    x, y = _f64(x), _f64(y)
    x, y = x - x.mean(0), y - y.mean(0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / den) if den > 0 else float("nan")


def effective_dimension(rho: Any, threshold: float = 0.5) -> int:
    """How many canonical correlations reach ``threshold``: the dimension of the mappable subspace."""
    return int((_f64(rho) >= threshold).sum())


def participation_ratio(x: Any) -> float:
    """(Σ λ)² / Σ λ² of the covariance eigenvalues of the rows of ``x`` (0 for constant data)."""
    x = _f64(x)
    lam = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return float(lam.sum() ** 2 / (lam ** 2).sum()) if (lam ** 2).sum() > 0 else 0.0
