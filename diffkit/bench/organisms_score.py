"""Scoring a method against an organism's token-level answer key: pure functions on arrays.

Formulas (the report repeats them):

- **Planted item.** A feature or crosscoder latent i with activation mass ``m_i = Σ_t f_i,t`` over
  the store's tokens and ``m_i^l = Σ_{t: label l} f_i,t`` on the tokens of planted label l (each
  part of the behaviour: trigger, response; name, relation, place; ...) is *planted* when for some
  l its share ``s = m_i^l / m_i`` is at least ``factor`` times the label's share ρ_l of the store's
  tokens, in odds: ``s / (1 − s) ≥ factor · ρ_l / (1 − ρ_l)``, i.e. ``s ≥ factor ρ_l / (1 + (factor − 1) ρ_l)``.
  For a rare label this is the plain ``s ≥ factor · ρ_l`` (backdoor: within 1%); the odds form
  keeps it satisfiable where ``factor · ρ_l`` would exceed 1 (code rows are half the code
  organism's store). ``factor`` = 20 by default, 10 and 50 shown too. An item that never fires is
  not planted.
- **A method's list** is its ranked "B has it, A does not / changed" list, given as one score per
  item (higher first). Items a method does not list (e.g. matched features for align's unmatched
  list) get −∞: they tie at the bottom. NaN scores count as −∞.
- **precision@k**: the planted fraction of the k top-scored items. Ties are broken uniformly at
  random and the *expected* value reported: items above the k-th score count fully, the tied
  group at the boundary contributes its planted fraction times the places left — so a method
  that scores everything alike gets the base rate, not an accident of input order.
- **first planted rank**: the expected rank of the best-ranked planted item under the same tie
  rule: ``1 + #(items scored above it) + u / (p + 1)`` with ``u``, ``p`` the non-planted and
  planted items tied with it (NaN when nothing is planted).
- **AUROC**: planted vs not planted items under the score (:func:`diffkit.metrics.auroc`, ties
  half); **token AUROC**: planted vs ordinary tokens under a per-token score.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..metrics import auroc

FACTORS = (10.0, 20.0, 50.0)
DEFAULT_FACTOR = 20.0


def share_threshold(base_rate: float, factor: float = DEFAULT_FACTOR) -> float:
    """The share of mass a planted item needs on a label of share ``base_rate``: odds ``factor`` times the label's."""
    return factor * base_rate / (1.0 + (factor - 1.0) * base_rate)


def planted_items(mass: np.ndarray, mass_planted: np.ndarray, base_rate: float, factor: float = DEFAULT_FACTOR) -> np.ndarray:
    """Boolean per item: share of activation mass on one planted label ≥ :func:`share_threshold` (module docstring)."""
    mass = np.asarray(mass, np.float64)
    mass_planted = np.asarray(mass_planted, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(mass > 0, mass_planted / np.where(mass > 0, mass, 1.0), 0.0)
    return (mass > 0) & (share >= share_threshold(base_rate, factor))


def planted_by_label(mass: np.ndarray, mass_by_label: dict[int, np.ndarray], labels: np.ndarray,
                     factor: float = DEFAULT_FACTOR) -> np.ndarray:
    """Planted for any label l > 0 of the token ``labels`` (``mass_by_label[l]``: each item's mass on label l)."""
    labels = np.asarray(labels)
    out = np.zeros(len(mass), bool)
    for lab, m in mass_by_label.items():
        rate = float((labels == lab).mean()) if len(labels) else 0.0
        if lab > 0 and rate > 0:
            out |= planted_items(mass, m, rate, factor)
    return out


def _clean(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, np.float64).copy()
    s[~np.isfinite(s) & ~(s == np.inf)] = -np.inf  # NaN and −∞ -> −∞ (not listed); +∞ stays on top
    return s


def precision_at_k(scores: np.ndarray, planted: np.ndarray, k: int) -> float:
    """Expected planted fraction of the top ``k`` under uniformly random tie-breaking."""
    s, y = _clean(scores), np.asarray(planted, bool)
    k = min(int(k), len(s))
    if k <= 0:
        return float("nan")
    kth = np.sort(s)[::-1][k - 1]
    above = s > kth
    tied = s == kth
    left = k - int(above.sum())
    return float((y[above].sum() + left * y[tied].mean()) / k)


def first_planted_rank(scores: np.ndarray, planted: np.ndarray) -> float:
    """Expected rank (1 = top) of the best-ranked planted item under random tie-breaking; NaN if none is planted."""
    s, y = _clean(scores), np.asarray(planted, bool)
    if not y.any():
        return float("nan")
    best = s[y].max()
    above = int((s > best).sum())
    tied = s == best
    p, u = int((tied & y).sum()), int((tied & ~y).sum())
    return float(1 + above + u / (p + 1))


def safe_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC, NaN when one class is empty (NaN scores count as −∞)."""
    labels = np.asarray(labels, bool)
    if not 0 < labels.sum() < len(labels):
        return float("nan")
    s = _clean(scores)
    s[s == -np.inf] = (s[np.isfinite(s)].min() - 1.0) if np.isfinite(s).any() else 0.0
    s[s == np.inf] = (s[np.isfinite(s)].max() + 1.0) if np.isfinite(s).any() else 1.0
    return auroc(s, labels)


def listed_scores(n_items: int, listed: np.ndarray, order_scores: np.ndarray | None = None) -> np.ndarray:
    """Scores for a method that returns a ranked list of some items: listed items in list order
    (first = highest, or by ``order_scores``), every other item −∞."""
    out = np.full(n_items, -np.inf)
    listed = np.asarray(listed, np.int64)
    if order_scores is None:
        out[listed] = np.arange(len(listed), 0, -1, dtype=np.float64)
    else:
        out[listed] = _clean(order_scores)
        out[listed[out[listed] == -np.inf]] = np.nextafter(-np.inf, 0)  # listed beats unlisted, even at −∞
    return out


def method_scores(scores: np.ndarray, planted: np.ndarray, token_scores: np.ndarray | None = None,
                  token_labels: np.ndarray | None = None) -> dict[str, Any]:
    """The summary.json entry of one method on one organism (module docstring)."""
    y = np.asarray(planted, bool)
    out: dict[str, Any] = {"precision_at_10": precision_at_k(scores, y, 10), "precision_at_50": precision_at_k(scores, y, 50),
                           "first_planted_rank": first_planted_rank(scores, y), "auroc": safe_auroc(scores, y),
                           "n_items": int(len(y)), "n_planted": int(y.sum())}
    if token_scores is not None and token_labels is not None:
        out["token_auroc"] = safe_auroc(token_scores, np.asarray(token_labels) > 0)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
