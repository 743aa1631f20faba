"""Calibrated verdicts (diffkit.calibrate): planted answers come back with small q, SAE noise gets none,
and the streamed formulas agree with one-shot float64 references."""

import warnings

import numpy as np
import pytest
import torch

from diffkit.codes import Codes
from diffkit.calibrate import (ProbeSums, benjamini_hochberg, empirical_p_lower, empirical_p_upper, robust_t_p,
                               tailed_p_lower, train_mask_fn)


# -- formulas against references ---------------------------------------------------------------------

def _bh_reference(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg written out: q_(i) = min_{j >= i} p_(j) m / j, capped at 1."""
    m = len(p)
    order = np.argsort(p)
    q = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return q


def test_benjamini_hochberg_matches_scipy_and_the_step_up_rule():
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 1, 200), rng.uniform(0, 1e-3, 20)])
    q = benjamini_hochberg(p)
    assert np.allclose(q, false_discovery_control(p, method="bh"))
    assert np.allclose(q, _bh_reference(p))
    # A hand example: m = 4, p = (0.01, 0.02, 0.03, 0.5) -> q = (0.04, 0.04, 0.04, 0.5).
    assert np.allclose(benjamini_hochberg(np.array([0.01, 0.02, 0.03, 0.5])), [0.04, 0.04, 0.04, 0.5])
    # NaN entries are not tests: they stay NaN and do not count in m.
    q_nan = benjamini_hochberg(np.array([0.01, np.nan, 0.02, 0.03, 0.5]))
    assert np.isnan(q_nan[1]) and np.allclose(q_nan[[0, 2, 3, 4]], [0.04, 0.04, 0.04, 0.5])


def test_empirical_p_values_count_the_reference():
    ref = np.arange(1.0, 10.0)  # 1..9
    assert np.allclose(empirical_p_lower(np.array([0.5, 1.0, 5.0, np.nan]), ref), [0.1, 0.2, 0.6, 1.0])
    assert np.allclose(empirical_p_upper(np.array([9.5, 9.0]), ref), [0.1, 0.2])
    # Below the reference: an exponential tail, continuous at the minimum, decreasing, never above 1/(1+N).
    ref = np.linspace(0.8, 1.0, 99)
    p = tailed_p_lower(np.array([0.8, 0.79, 0.5, 0.0, 0.9]), ref)
    assert p[0] == pytest.approx(0.02) and p[1] < 0.01 and p[2] < p[1] and p[3] < 1e-6
    assert p[4] == pytest.approx(empirical_p_lower(np.array([0.9]), ref)[0])
    # The t null: the median gets p = 1, a point 20 MADs out a small p.
    x = np.concatenate([np.linspace(-1, 1, 100), [20.0]])  # 101 values: the median is x[50]
    p = robust_t_p(x)
    assert p[50] == pytest.approx(1.0) and p[-1] < 1e-3


def _probe_reference(x_tr, f_tr, x_te, f_te, ridge=1e-4):
    """One-shot float64 ridge least squares (numpy lstsq on the augmented system), scored on held-out rows."""
    mx, mf = x_tr.mean(0), f_tr.mean(0)
    xc, fc = x_tr - mx, f_tr - mf
    n, d = xc.shape
    lam = ridge * np.trace(xc.T @ xc / n) / d
    aug_x = np.vstack([xc / np.sqrt(n), np.sqrt(lam) * np.eye(d)])
    aug_f = np.vstack([fc / np.sqrt(n), np.zeros((d, f_tr.shape[1]))])
    w = np.linalg.lstsq(aug_x, aug_f, rcond=None)[0]
    pred = (x_te - mx) @ w + mf
    return 1 - ((f_te - pred) ** 2).mean(0) / f_te.var(0)


@pytest.mark.parametrize("budget", [1e12, 1.0])  # float64 sums; float32 sums (the large-SAE path)
@pytest.mark.parametrize("firing", [0.3, 0.012])  # dense codes (GEMMs); sparse ones (scatters of the entries)
def test_streamed_probe_r2_matches_one_shot_lstsq(budget, firing):
    rng = np.random.default_rng(1)
    n, d_a, d_b, n_f = 20_000, 6, 5, 7
    xa = rng.normal(size=(n, d_a)) @ rng.normal(size=(d_a, d_a)) + 5.0  # correlated, far from zero mean
    xb = np.tanh(xa[:, :d_b]) + 0.3 * rng.normal(size=(n, d_b))
    fa = np.maximum(xa @ rng.normal(size=(d_a, n_f)), 0) * (rng.uniform(size=(n, n_f)) < firing)  # nonlinear
    fb = np.maximum(xb @ rng.normal(size=(d_b, n_f)), 0) * (rng.uniform(size=(n, n_f)) < firing)
    train = (np.arange(n) % 10) != 3
    acc = ProbeSums(d_a, d_b, n_f, n_f, train_mask=lambda r0, m: torch.from_numpy(train[r0:r0 + m]),
                    budget_bytes=budget)
    t = lambda a: torch.from_numpy(a).float()  # noqa: E731  the store hands float32 batches
    assert Codes(t(fa[:512])).is_dense == (firing > 0.1)  # each case takes the path it names
    for i in range(0, n, 512):
        sl = slice(i, i + 512)
        acc.update(t(xa[sl]), t(xb[sl]), t(fa[sl]), t(fb[sl]))
    x32 = {"a": t(xa).double().numpy(), "b": t(xb).double().numpy()}
    f32 = {"a": t(fa).double().numpy(), "b": t(fb).double().numpy()}
    tol = 1e-6 if budget > 1 else 1e-4
    for m in ("a", "b"):
        for s in ("a", "b"):
            with np.errstate(divide="ignore", invalid="ignore"):
                ref = _probe_reference(x32[m][train], f32[s][train], x32[m][~train], f32[s][~train])
            ref[~np.isfinite(ref)] = np.nan  # a feature silent on the held-out rows has no R² (NaN, not −inf)
            assert np.isfinite(ref).sum() >= 3 and np.allclose(acc.r2(m, s), ref, atol=tol, equal_nan=True), (m, s)
    # Large SAEs: only the targets (unmatched) and a sample of the rest are probed, with the same values.
    sub = ProbeSums(d_a, d_b, n_f, n_f, train_mask=lambda r0, m: torch.from_numpy(train[r0:r0 + m]),
                    budget_flops=0, null_sample=2)
    sub.prepare(np.array([0, 1]), np.array([3]))
    for i in range(0, n, 512):
        sl = slice(i, i + 512)
        sub.update(t(xa[sl]), t(xb[sl]), t(fa[sl]), t(fb[sl]))
    got, full = sub.r2("b", "a"), acc.r2("b", "a")
    probed = np.zeros(n_f, bool)
    probed[sub.cols["a"]] = True
    assert probed[[0, 1]].all() and probed.sum() == 4 and np.isnan(got[~probed]).all()
    assert np.allclose(got[probed], full[probed], atol=tol, equal_nan=True)
    # Without a mask: fitted and scored on the same rows.
    acc = ProbeSums(d_a, d_b, n_f, n_f)
    acc.update(t(xa), t(xb), t(fa), t(fb))
    ref = _probe_reference(x32["b"], f32["a"], x32["b"], f32["a"])
    assert np.allclose(acc.r2("b", "a"), ref, atol=1e-6)


def test_train_mask_follows_the_store_row_order(small_store):
    mask_fn = train_mask_fn(small_store, "all")
    n = small_store.n_tokens("all")
    mask = torch.cat([mask_fn(r, min(500, n - r)) for r in range(0, n, 500)]).numpy()
    assert mask.sum() == small_store.n_tokens("train") and (~mask).sum() == small_store.n_tokens("heldout")
    # Row by row, the unshuffled "all" pass equals train rows where the mask says so.
    xa_all = torch.cat([a for a, _ in small_store.iter_batches(700, split="all", shuffle=False, drop_last=False,
                                                                normalized=False)])
    xa_train = torch.cat([a for a, _ in small_store.iter_shards("train", normalized=False)])
    assert torch.equal(xa_all[torch.from_numpy(mask)], xa_train)
    assert train_mask_fn(small_store, "train") is None


# -- planted answers through align -------------------------------------------------------------------

def _align(store, sae_a, sae_b, **kw):
    from diffkit.diff import AlignConfig, align
    from diffkit.linear_map import LinearMap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return align(store, sae_a, sae_b, LinearMap().fit(store), AlignConfig(n_contexts=0), **kw)


def _planted_sae(pair, side, rows, out, seed, jitter=0.3):
    """A planted SAE (sae-lens TopK, decoder = the generating dictionary, jittered) of only ``rows`` features."""
    from diffkit.saes import load_sae
    from diffkit.synthetic import planted_sae

    dictionary, mean = (pair.dict_a, pair.mean_a) if side == "a" else (pair.dict_b, pair.mean_b)
    sae = planted_sae(dictionary[rows], mean, k=4, jitter=jitter, seed=seed)
    sae.cfg.metadata.model_name = f"planted:{side}"
    sae.save_model(str(out))
    return load_sae(str(out))


def test_planted_exclusive_features_get_small_q_and_shared_ones_none(tmp_path):
    from diffkit.activations import ActivationStore
    from diffkit.synthetic import PlantedConfig, make_planted, write_planted_store

    pair = make_planted(PlantedConfig(d_a=32, d_b=32, n_shared=96, n_a_only=16, n_b_only=16, noise=0.1,
                                      n_tokens=8192, seed=2))
    write_planted_store(pair, tmp_path / "store")
    store = ActivationStore.open(tmp_path / "store")
    sae_a = _planted_sae(pair, "a", np.arange(len(pair.dict_a)), tmp_path / "a", seed=0)
    sae_b = _planted_sae(pair, "b", np.arange(len(pair.dict_b)), tmp_path / "b", seed=1)
    seed_a = _planted_sae(pair, "a", np.arange(len(pair.dict_a)), tmp_path / "a1", seed=7)
    diff = _align(store, sae_a, sae_b, null_saes={"a": seed_a})
    t = diff.table
    for side, planted in (("a", pair.a_only), ("b", pair.b_only)):
        called = set(t.loc[t.verdict == f"{side}_only", f"feature_{side}"])
        assert len(called & set(planted)) >= 0.9 * len(planted), side  # planted exclusives called ...
        assert len(called - set(planted)) <= 1, side                   # ... and (almost) nothing else
        rows = t[(t[f"feature_{side}"].isin(planted)) & (t.kind == f"{side}_only")]
        # Not 0: a planted SAE's latent also picks up interference from shared features, which B carries.
        assert (rows.retention < 0.5).all() and (rows.q_exclusive <= 0.1).mean() >= 0.9
    shared = t[t.kind == "shared"]
    assert shared.retention.median() > 0.7 and shared.q_exclusive.isna().all()
    cal = diff.summary["calibration"]
    assert cal["sentence"].startswith(f"{cal['calls']['a_only']} A-only at FDR 10% (of ")
    assert cal["null_changed"].startswith("SAE-seed null") and "seed_cosine_a" in t
    assert cal["heldout_probe"] and {"p_exclusive", "p_changed", "q_changed", "many_to_one_r2"} <= set(t.columns)
    # The old columns keep their meaning: kind is the assignment's call at the threshold.
    assert set(t.kind) == {"shared", "a_only", "b_only"} and "similarity" in t and "act_mass_log_ratio" in t


def test_sae_noise_control_gets_no_exclusive_call(tmp_path):
    """Nothing exclusive between the models; each SAE misses a different 12 of the shared features, so
    12 features per side are unmatched by the SAEs alone. None is exclusive, and none may be called."""
    from diffkit.activations import ActivationStore
    from diffkit.synthetic import PlantedConfig, make_planted, write_planted_store

    pair = make_planted(PlantedConfig(d_a=32, d_b=32, n_shared=112, n_a_only=0, n_b_only=0, noise=0.1,
                                      n_tokens=8192, seed=3))
    write_planted_store(pair, tmp_path / "store")
    store = ActivationStore.open(tmp_path / "store")
    rng = np.random.default_rng(0)
    drop = rng.permutation(len(pair.dict_a))[:24]
    keep_a = np.setdiff1d(np.arange(len(pair.dict_a)), drop[:12])            # SAE A misses 12 features ...
    keep_b = np.setdiff1d(np.arange(len(pair.dict_b)), pair.match_a_to_b[drop[12:]])  # ... SAE B 12 others
    diff = _align(store, _planted_sae(pair, "a", keep_a, tmp_path / "a", 0), _planted_sae(pair, "b", keep_b, tmp_path / "b", 1))
    t = diff.table
    assert (t.kind == "a_only").sum() >= 12 and (t.kind == "b_only").sum() >= 12
    assert not t.verdict.isin(["a_only", "b_only"]).any()
    unmatched = t[t.kind != "shared"]
    assert (unmatched.retention.dropna() > 0.5).all()  # the other model carries every one of them


# -- the map-error test ---------------------------------------------------------------------------------

def _lognormal_bulk(n: int, spread: float = 0.1) -> np.ndarray:
    """Map errors of n unchanged features: exact normal quantiles on the log scale (no sampling)."""
    from scipy.stats import norm

    return np.exp(spread * norm.ppf((np.arange(n) + 0.5) / n))


def test_map_error_p_calls_the_features_where_the_map_fails_and_not_the_bulk():
    from diffkit.calibrate import map_error_p

    bulk = _lognormal_bulk(995)
    planted = np.array([1.8, 2.0, 2.5, 3.0, 4.0])       # 6 to 14 bulk SDs out on the log scale
    x = np.concatenate([bulk, planted, [np.nan]])        # a feature that never fired: no test
    p = map_error_p(x)
    q = benjamini_hochberg(p)
    assert np.isnan(p[-1]) and np.isnan(q[-1])
    assert (q[995:1000] <= 0.01).all()
    assert (q[:995] <= 0.1).sum() <= 1                   # at most the bulk's 0.9995 quantile rides along
    assert (benjamini_hochberg(map_error_p(bulk)) <= 0.1).sum() == 0  # the bulk alone: no call
    # One-sided: a feature with far *less* error than the bulk is no call.
    assert map_error_p(np.concatenate([bulk, [0.2]]))[-1] > 0.99


def test_map_error_rows_bonferroni_for_pairs_and_no_test_for_an_exact_map():
    import pandas as pd

    from diffkit.calibrate import _map_error_rows, map_error_p

    bulk = _lognormal_bulk(200)
    a, b = bulk.copy(), bulk[::-1].copy()
    b[0] = 5.0  # B's feature 0 is where the map fails
    table = pd.DataFrame({"map_err_a": a, "map_err_b": b})
    p, note = _map_error_rows(table, {"a": 0.2, "b": 0.2})
    pa, pb = map_error_p(a), map_error_p(b)
    assert p[0] == pytest.approx(min(1.0, 2 * min(pa[0], pb[0]))) and p[0] < 1e-6
    assert "empirical null" in note
    # The same model twice: the map is exact, its error rounding; B gets no test, A still does.
    p_exact, note = _map_error_rows(table, {"a": 0.2, "b": 1e-9})
    assert np.allclose(p_exact, pa) and "no test for B" in note
    # Dead features (freq 0) score exactly 1, the prior alone: out of the null's bulk and untested. With 3
    # of 4 features dead the bulk would otherwise have MAD 0 and no feature could be called.
    dead = pd.DataFrame({"map_err_a": np.concatenate([a, np.ones(600)]), "map_err_b": np.concatenate([b, np.ones(600)]),
                         "freq_a": np.r_[np.full(200, 0.01), np.zeros(600)], "freq_b": np.r_[np.full(200, 0.01), np.zeros(600)]})
    p_dead, _ = _map_error_rows(dead, {"a": 0.2, "b": 0.2})
    assert np.isnan(p_dead[200:]).all() and np.allclose(p_dead[:200], p, equal_nan=True)
    # Without the divergence's columns there is nothing to test.
    p_none, note = _map_error_rows(table[["map_err_a"]], None)
    assert note is None and np.isnan(p_none).all()
