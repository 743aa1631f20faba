"""CCA / SVCCA / linear CKA / effective dimension against values their definitions promise."""

import numpy as np
import pytest
import torch

from diffkit.metrics import (canonical_correlations, cca_of_samples, effective_dimension, linear_cka, mean_cca,
                             participation_ratio, svcca)


def _orth(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_cca_identical_linear_and_independent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6))
    assert cca_of_samples(x, x) == pytest.approx(1.0, abs=1e-4)
    assert cca_of_samples(x, x @ rng.normal(size=(6, 6)) + 3.0) == pytest.approx(1.0, abs=1e-4)
    assert cca_of_samples(x, rng.normal(size=(2000, 6))) < 0.1  # bias ~ sqrt(d / N)
    rho = canonical_correlations(x, x[:, :2])
    assert rho.shape == (2,) and np.all(np.diff(rho) <= 1e-12)


def test_cca_pins_the_crosscoder_value_and_takes_torch():
    """The implementation moved from baselines/crosscoder/analysis.py: the same number as before the move."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = x[:, :3] @ torch.randn(3, 4, generator=g) + 0.5 * torch.randn(200, 4, generator=g)
    assert cca_of_samples(x, y) == pytest.approx(0.720885245578786, abs=1e-9)
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    assert mean_cca(xc.T @ xc, yc.T @ yc, xc.T @ yc) == pytest.approx(0.720885245578786, abs=1e-9)


def test_effective_dimension_counts_the_shared_directions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 6))
    y = np.concatenate([x[:, :3] @ _orth(3, 2), rng.normal(size=(3000, 3))], axis=1) + 0.1 * rng.normal(size=(3000, 6))
    rho = canonical_correlations(x, y)
    assert effective_dimension(rho, 0.5) == 3
    assert effective_dimension(rho, 0.999) == 0


def test_linear_cka_invariances():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1500, 8)) @ rng.normal(size=(8, 8))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 2.5 * x @ _orth(8, 4) + 1.0) == pytest.approx(1.0, abs=1e-10)  # orthogonal + isotropic scale
    assert linear_cka(x, x @ np.diag([1, 1, 1, 1, 1, 1, 1, 50.0])) < 0.95  # not invariant to anisotropic scaling
    assert linear_cka(rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))) < 0.05


def test_svcca_drops_low_variance_noise_and_participation_ratio():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 4))
    noisy = np.concatenate([x @ _orth(4, 6), 1e-4 * rng.normal(size=(2000, 4))], axis=1)
    assert svcca(x, noisy) == pytest.approx(1.0, abs=1e-3)
    assert cca_of_samples(x, noisy) == pytest.approx(1.0, abs=1e-3)
    assert participation_ratio(rng.normal(size=(20000, 5))) == pytest.approx(5.0, rel=0.05)
    assert participation_ratio(np.outer(rng.normal(size=500), rng.normal(size=7))) == pytest.approx(1.0, abs=1e-9)
