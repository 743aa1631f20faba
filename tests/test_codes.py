"""diffkit.codes: the per-feature sums from the nonzero entries equal the dense computations."""

import numpy as np
import pytest
import torch

from diffkit.codes import DENSE_ABOVE, Codes, as_codes

# Entries' scatters below DENSE_ABOVE, the dense matrix's own ops above it: both give the same answer.
DENSITIES = pytest.mark.parametrize("density", [0.005, 0.5])


def _sparse_codes(rows=600, n=50, seed=0, density=0.05):
    rng = np.random.default_rng(seed)
    dense = rng.uniform(0.1, 5.0, size=(rows, n)) * (rng.uniform(size=(rows, n)) < density)
    dense[:, 7] = 0.0          # a dead feature
    dense[:5, 9] = [3, 1, 4, 1.5, 2]  # a feature that fires on fewer rows than asked for
    dense[5:, 9] = 0.0
    return torch.from_numpy(dense).float()


@DENSITIES
def test_feature_sums_match_the_dense_sums(density):
    f = _sparse_codes(density=density)
    codes = Codes(f)
    assert codes.is_dense == (density > DENSE_ABOVE)
    count, total, sumsq = codes.feature_sums()
    f64 = f.double()
    assert torch.equal(count, (f > 0).sum(0))
    assert torch.allclose(total, f64.sum(0), rtol=1e-12) and torch.allclose(sumsq, (f64 ** 2).sum(0), rtol=1e-12)


@DENSITIES
def test_top_rows_are_each_features_largest_activations(density):
    f = _sparse_codes(density=density)
    top_val, top_row = Codes(f).top_rows(3, row0=1000)
    ref_val, ref_row = f.topk(3, dim=0)
    fired = ref_val.T > 0
    assert torch.equal(top_val[fired], ref_val.T[fired]) and torch.equal(top_row[fired], ref_row.T[fired] + 1000)
    assert (top_row[7] == -1).all() and (top_val[7] == -1).all()  # dead: nothing to show
    assert top_row[9].tolist() == [1002, 1000, 1004]               # 4, 3, 2 of its five firings


@DENSITIES
def test_padded_holds_each_rows_active_features(density):
    f = _sparse_codes(density=density)
    idx, vals = Codes(f).padded()
    rebuilt = torch.zeros_like(f, dtype=torch.float64).scatter_add_(1, idx, vals)
    assert torch.equal(rebuilt, f.double()) and idx.shape[1] == int((f > 0).sum(1).max())


def test_empty_and_wrapped():
    empty = Codes(torch.zeros(4, 0))
    count, total, _ = empty.feature_sums()
    assert len(count) == 0 and len(total) == 0 and empty.padded()[0].shape == (4, 1)
    f = _sparse_codes()
    c = Codes(f)
    assert as_codes(c) is c and as_codes(None) is None and torch.equal(as_codes(f).dense, f)
