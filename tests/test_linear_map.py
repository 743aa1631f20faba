"""The streamed affine map: moments vs a one-shot float64 reference, closed forms, artifact, warnings."""

import json

import numpy as np
import pytest

from diffkit.errors import DiffkitError
from diffkit.linear_map import MAP_JSON, MAP_TENSORS, LinearMap, Moments
from diffkit.metrics import fve


def _planted(n=3000, d_a=12, d_b=20, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_a)) * rng.uniform(0.5, 3, d_a) + 7.0  # a large mean: centering matters
    w = rng.normal(size=(d_a, d_b))
    b = rng.normal(size=d_b)
    y = x @ w + b + noise * rng.normal(size=(n, d_b))
    return x, y, w, b


def test_streamed_moments_equal_one_shot_float64_reference():
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(5000, 9)) * 3 + 1000.0).astype(np.float32)  # offset 1000: naive sums lose digits
    m = Moments(9)
    for chunk in np.array_split(z, [7, 300, 301, 2500]):  # uneven shards, one of a single row
        m.add(chunk)
    z64 = z.astype(np.float64)
    ref_mean = z64.mean(0)
    ref_c = (z64 - ref_mean).T @ (z64 - ref_mean)
    assert m.n == 5000
    np.testing.assert_allclose(m.mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(m.C, ref_c, rtol=1e-9, atol=1e-7)


def test_lstsq_recovers_a_planted_affine_map_both_ways():
    x, y, w, b = _planted(noise=0.0)
    m = LinearMap().fit_arrays(x[:2500], y[:2500], x[2500:], y[2500:])
    np.testing.assert_allclose(m.W_ab_, w, atol=1e-8)
    np.testing.assert_allclose(m.b_ab_, b, atol=1e-7)
    assert m.scores_["a_to_b"]["heldout_fve"] == pytest.approx(1.0, abs=1e-10)
    # B -> A: y has rank d_a inside d_b dims, so x is an exact affine function of y as well.
    np.testing.assert_allclose(m.predict_a(y[2500:]), x[2500:], atol=1e-6)


def test_heldout_fve_matches_the_stated_formula_overall_and_per_dim():
    x, y, _, _ = _planted(noise=2.0)
    m = LinearMap().fit_arrays(x[:2000], y[:2000], x[2000:], y[2000:])
    y_hat = m.predict_b(x[2000:])
    yh = y[2000:]
    assert m.scores_["a_to_b"]["heldout_fve"] == pytest.approx(fve(yh, y_hat), rel=1e-9)
    manual = 1 - ((yh - y_hat) ** 2).sum() / ((yh - yh.mean(0)) ** 2).sum()
    assert m.scores_["a_to_b"]["heldout_fve"] == pytest.approx(manual, rel=1e-9)
    per_dim = 1 - ((yh - y_hat) ** 2).sum(0) / ((yh - yh.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(m.scores_["a_to_b"]["heldout_fve_per_dim"], per_dim, rtol=1e-8)
    assert 0.3 < m.scores_["a_to_b"]["heldout_fve"] < 0.999  # the noise is visible
    # Train FVE from the moments equals the direct computation on the train rows.
    assert m.scores_["a_to_b"]["train_fve"] == pytest.approx(fve(y[:2000], m.predict_b(x[:2000])), rel=1e-9)


def test_ridge_is_the_closed_form_and_shrinks():
    x, y, _, _ = _planted(noise=0.5)
    alpha = 0.3
    m = LinearMap("ridge", alpha=alpha).fit_arrays(x, y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    ref = np.linalg.solve(xc.T @ xc + alpha * len(x) * np.eye(x.shape[1]), xc.T @ yc)
    np.testing.assert_allclose(m.W_ab_, ref, rtol=1e-8)
    plain = LinearMap().fit_arrays(x, y)
    assert np.linalg.norm(m.W_ab_) < np.linalg.norm(plain.W_ab_)


@pytest.mark.parametrize("d_a,d_b", [(16, 16), (12, 20)])
def test_procrustes_recovers_a_scaled_orthogonal_map(d_a, d_b):
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(d_b, d_a)))
    Q = q.T  # (d_a, d_b), orthonormal rows
    x = rng.normal(size=(4000, d_a))
    y = 2.5 * x @ Q + 1.0
    m = LinearMap("procrustes").fit_arrays(x, y)
    np.testing.assert_allclose(m.W_ab_, 2.5 * Q, atol=1e-8)
    np.testing.assert_allclose(m.b_ab_, np.ones(d_b), atol=1e-8)


def test_procrustes_to_a_narrower_space_is_semi_orthogonal():
    """d_in > d_out: W = s·U Vᵀ has orthonormal columns and maximises tr(Wᵀ S_xy) (the Procrustes objective)."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(3000, 20)), rng.normal(size=(3000, 12))
    m = LinearMap("procrustes").fit_arrays(x, y)
    w = m.W_ab_
    s = np.sqrt((w ** 2).sum() / 12)
    np.testing.assert_allclose(w.T @ w / s ** 2, np.eye(12), atol=1e-10)
    u, _, vt = np.linalg.svd((x - x.mean(0)).T @ (y - y.mean(0)), full_matrices=False)
    np.testing.assert_allclose(w / s, u @ vt, atol=1e-10)


def test_too_few_tokens_warns_or_refuses():
    x, y, _, _ = _planted(n=150, d_a=12, d_b=20)
    with pytest.warns(UserWarning, match="collect at least 200 tokens"):
        m = LinearMap().fit_arrays(x, y)
    assert "below 10·d" in m.warnings_[0]
    with pytest.raises(DiffkitError, match="more tokens than dimensions"):
        LinearMap().fit_arrays(x[:20], y[:20])


@pytest.mark.parametrize("kwargs,match", [({"method": "magic"}, "unknown map method"),
                                          ({"method": "ridge"}, "ridge with --alpha 0"),
                                          ({"alpha": 1.0}, "applies to ridge only"),
                                          ({"space": "weird"}, "unknown activation space")])
def test_bad_options_are_one_line_errors(kwargs, match):
    with pytest.raises(DiffkitError, match=match):
        LinearMap(**kwargs).fit_arrays(np.zeros((50, 2)), np.zeros((50, 2)))


def test_fit_on_a_store_save_and_load_round_trip(small_store, tmp_path):
    m = LinearMap().fit(small_store)
    assert (m.d_a_, m.d_b_) == (32, 48)
    assert m.n_train_ == small_store.n_tokens("train") and m.n_heldout_ == small_store.n_tokens("heldout")
    assert m.n_heldout_ > 0 and np.isfinite(m.scores_["a_to_b"]["heldout_fve"])
    # Reference: one-shot lstsq on the whole train split in memory.
    xa, xb = small_store.batch(np.arange(small_store.n_tokens("train")), "train", normalized=False)
    xa, xb = xa.double().numpy(), xb.double().numpy()
    xc = np.c_[xa, np.ones(len(xa))]
    ref = np.linalg.lstsq(xc, xb, rcond=None)[0]
    np.testing.assert_allclose(m.W_ab_, ref[:-1], rtol=1e-5, atol=1e-6)
    m.save(tmp_path / "map")
    meta = json.loads((tmp_path / "map" / MAP_JSON).read_text())
    assert meta["config"] == {"method": "lstsq", "alpha": 0.0, "space": "raw"}
    assert meta["store"]["hook_b"] == "blocks.1.hook_resid_post" and "fve_formula" in meta
    back = LinearMap.load(tmp_path / "map")
    np.testing.assert_array_equal(back.W_ba_, m.W_ba_)
    np.testing.assert_allclose(back.predict_b(xa[:5]), m.predict_b(xa[:5]))
    (tmp_path / "map" / MAP_TENSORS).unlink()
    with pytest.raises(DiffkitError, match="has no map.safetensors"):
        LinearMap.load(tmp_path / "map")


def test_normalized_space_changes_w_by_the_ratio_of_scales_only(small_store):
    raw = LinearMap().fit(small_store)
    norm = LinearMap(space="normalized").fit(small_store)
    ratio = small_store.scale("b") / small_store.scale("a")
    np.testing.assert_allclose(norm.W_ab_, raw.W_ab_ * ratio, rtol=1e-4, atol=1e-6)
    assert norm.scores_["a_to_b"]["heldout_fve"] == pytest.approx(raw.scores_["a_to_b"]["heldout_fve"], abs=1e-6)
