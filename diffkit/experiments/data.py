"""Datasets of the toy experiments, all generated offline: scikit-learn's 8×8 digits and mnist1d.

Every model is *evaluated* on the same inputs, whatever it was trained on: the digits' fixed
held-out split (:data:`HELDOUT`, 597 images of all ten classes). Maps between two models are fitted
on the latents of the digits' train split (all classes, 1,200 images) and scored on the held-out
split, so neither the models nor the maps have seen the inputs they are scored on.

Training sets (``DataSpec.name``):

==================  ============================================================================
``digits``          the train split, digits 0–9
``digits0-8``       digits 0–8 (experiment 2A, against ``digits``)
``digits0-4``       digits 0–4; ``digits5-9`` digits 5–9 (2B)
``mix:P``           as many images as ``digits0-4`` has, a fraction P of them drawn from 5–9 and
                    the rest from 0–4 (partial overlap; ``mix:0`` is ``digits0-4``, ``mix:1`` is
                    all 5–9)
``digits-T``        the train split transposed and inverted (x → 1 − xᵀ): a strongly transformed set (2C)
``mnist1d``         mnist1d (4,000 sequences of 40 samples) linearly resampled to 64 inputs and
                    scaled to [0, 1]: another dataset with the same input size and 10 classes (2C)
==================  ============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import DiffkitError

N_TRAIN = 1200
SPLIT_SEED = 0
D_IN = 64
FIXED = ("digits", "digits0-8", "digits0-4", "digits5-9", "digits-T", "mnist1d")


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, 64) float32 in [0, 1]
    y: np.ndarray  # (N,) int64 labels


@lru_cache(maxsize=1)
def digits() -> tuple[Split, Split]:
    """(train, held-out) split of the 1,797 digits, fixed by :data:`SPLIT_SEED`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    tr, he = order[:N_TRAIN], order[N_TRAIN:]
    return Split(x[tr], d.target[tr].astype(np.int64)), Split(x[he], d.target[he].astype(np.int64))


@lru_cache(maxsize=1)
def mnist1d_64() -> Split:
    """mnist1d's train sequences resampled from 40 to 64 points, min-max scaled to [0, 1]."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 5000
    d = make_dataset(args)
    x40 = np.asarray(d["x"], dtype=np.float64)
    grid = np.linspace(0, x40.shape[1] - 1, D_IN)
    x = np.stack([np.interp(grid, np.arange(x40.shape[1]), row) for row in x40])
    x = (x - x.min()) / (x.max() - x.min())
    return Split(x.astype(np.float32), np.asarray(d["y"], dtype=np.int64))


def _labels(split: Split, lo: int, hi: int) -> Split:
    keep = (split.y >= lo) & (split.y <= hi)
    return Split(split.x[keep], split.y[keep])


def transform_t(x: np.ndarray) -> np.ndarray:
    """The 2C transform of digits: transpose each 8×8 image and invert its intensities."""
    return (1.0 - x.reshape(-1, 8, 8).transpose(0, 2, 1).reshape(-1, D_IN)).astype(np.float32)


def training_set(name: str, seed: int = 0) -> Split:
    """The training set called ``name`` (module docstring); ``seed`` draws the ``mix:P`` sample."""
    train, _ = digits()
    if name == "digits":
        return train
    if name == "digits0-8":
        return _labels(train, 0, 8)
    if name == "digits0-4":
        return _labels(train, 0, 4)
    if name == "digits5-9":
        return _labels(train, 5, 9)
    if name == "digits-T":
        return Split(transform_t(train.x), train.y)
    if name == "mnist1d":
        return mnist1d_64()
    if name.startswith("mix:"):
        try:
            p = float(name[4:])
        except ValueError:
            p = -1.0
        if not 0.0 <= p <= 1.0:
            raise DiffkitError(f"training set {name!r}: the mix fraction must be within [0, 1], e.g. mix:0.5")
        lo, hi = _labels(train, 0, 4), _labels(train, 5, 9)
        n = len(lo.y)
        n_hi = int(round(p * n))
        rng = np.random.default_rng(seed)
        i_lo = rng.choice(len(lo.y), n - n_hi, replace=False)
        i_hi = rng.choice(len(hi.y), min(n_hi, len(hi.y)), replace=False)
        return Split(np.concatenate([lo.x[i_lo], hi.x[i_hi]]), np.concatenate([lo.y[i_lo], hi.y[i_hi]]))
    raise DiffkitError(f"unknown training set {name!r}: use one of {', '.join(FIXED)} or mix:P")
