"""diffkit.divergence: a store where B = A except on a known set of tokens, and the method must find them.

B's activations are A's plus 3·v on 80 of 16,384 tokens (v a random unit direction); B's SAE has
A's dictionary plus v as its last feature. The answers: the worst-mapped tokens are the planted
ones, the feature that fires on them is first by map error and by the mean difference, and a
direction that is W_U's column for a token promotes that token through the unembedding.
"""

import dataclasses
import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from diffkit.activations import ActivationStore
from diffkit.cli import main
from diffkit.diff import AlignConfig, align
from diffkit.divergence import (Divergence, DivergenceConfig, load_token_scores, promoted_tokens, run_divergence,
                                split_positions)
from diffkit.errors import DiffkitError
from diffkit.linear_map import LinearMap
from diffkit.metrics import auroc
from diffkit.saes import load_sae
from diffkit.synthetic import PlantedConfig, make_planted, planted_sae, write_planted_store

N_PLANTED = 80


def _store_order(store, n_tokens: int) -> np.ndarray:
    """For each row of the store (split "all", reading order): the index of its token in the generated stream."""
    out = []
    ctx = store.config.ctx
    for s, shard in enumerate(store.manifest["shards"]):
        pos = np.asarray(store._array(s, "pos"))
        out.append((shard["seq_start"] + pos // ctx) * ctx + pos % ctx)
    return np.concatenate(out)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("divergence")
    cfg = PlantedConfig(n_a_only=0, n_b_only=0, n_tokens=16_384, noise=0.05, seed=3)
    pair = make_planted(cfg)
    rng = np.random.default_rng(0)
    mask = np.zeros(cfg.n_tokens, bool)
    mask[rng.choice(cfg.n_tokens, N_PLANTED, replace=False)] = True
    v = rng.standard_normal(cfg.d_b)
    v /= np.linalg.norm(v)
    acts_b = pair.acts_a.copy()
    acts_b[mask] += 3.0 * v
    write_planted_store(dataclasses.replace(pair, acts_b=acts_b.astype(np.float32)), root / "store")
    store = ActivationStore.open(root / "store")
    planted_sae(pair.dict_a, pair.mean_a, k=4).save_model(str(root / "sae_a"))
    planted_sae(np.vstack([pair.dict_a, v[None]]), pair.mean_a, k=5).save_model(str(root / "sae_b"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lmap = LinearMap().fit(store)
    lmap.save(root / "map")
    labels = mask[_store_order(store, cfg.n_tokens)]
    return {"root": root, "store": store, "lmap": lmap, "labels": labels, "planted_feature": len(pair.dict_a),
            "sae_a": load_sae(str(root / "sae_a")), "sae_b": load_sae(str(root / "sae_b"))}


def test_worst_mapped_tokens_are_the_planted_ones(planted):
    res = run_divergence(planted["store"], planted["lmap"], DivergenceConfig(top_tokens=50))
    labels = planted["labels"]
    assert labels.sum() == N_PLANTED
    assert labels[res.top_rows["b"]].all()  # the 50 worst A→B tokens: every one planted
    assert auroc(res.token_error["b"], labels) > 0.99
    assert auroc(res.token_diff, labels) > 0.99  # direct mode: ‖x_B − x_A‖² finds them too
    assert res.mode == "direct" and not res.features  # no SAE given: no feature scores


def test_the_feature_firing_on_them_ranks_first(planted):
    res = run_divergence(planted["store"], planted["lmap"], DivergenceConfig(), planted["sae_a"], planted["sae_b"])
    fb = res.features["b"]
    top = planted["planted_feature"]
    assert int(fb.sort_values("map_err", ascending=False).feature.iloc[0]) == top
    assert int(fb.sort_values("diff_cos", ascending=False).feature.iloc[0]) == top
    assert int(fb.sort_values("diff_along", ascending=False).feature.iloc[0]) == top
    others = fb.map_err.drop(index=top)
    assert fb.map_err[top] > 3 * others.max()


def test_streamed_sums_match_a_one_shot_reference(planted):
    """The per-token errors and per-feature sums agree with a float64 recomputation over the whole split."""
    store, lmap = planted["store"], planted["lmap"]
    res = run_divergence(store, lmap, DivergenceConfig(batch_size=1000), None, planted["sae_b"])
    xa, xb = store.batch(np.arange(store.n_tokens("all")), split="all", normalized=False)
    xa, xb = xa.double().numpy(), xb.double().numpy()
    e_b = ((xb - lmap.predict_b(xa)) ** 2).sum(1)
    np.testing.assert_allclose(res.token_error["b"], e_b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.mean_delta["b"], (xb - xa).mean(0), atol=1e-6)
    f = planted["sae_b"].encode(store.batch(np.arange(len(xa)), split="all", normalized=False)[1], 1.0).double().numpy()
    np.testing.assert_allclose(res.features["b"].mass.to_numpy(), f.sum(0), rtol=1e-6)
    pos = split_positions(store, "all")
    p = 5
    np.testing.assert_allclose(res.mean_delta_by_pos[p], (xb - xa)[pos == p].mean(0), atol=1e-6)


def test_align_ranks_by_map_error_in_its_one_pass(planted):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diff = align(planted["store"], planted["sae_a"], planted["sae_b"], planted["lmap"],
                     AlignConfig(rank_by="map-error", n_contexts=0, threshold=0.3))
        plain = align(planted["store"], planted["sae_a"], planted["sae_b"], planted["lmap"],
                      AlignConfig(n_contexts=0, threshold=0.3))
    t = diff.table
    assert {"map_err_a", "map_err_b"} <= set(t.columns) and "map_err_b" not in plain.table.columns
    row = t[t.feature_b == planted["planted_feature"]].iloc[0]
    assert row["rank"] == 1  # first of its kind (B-only: v has no partner in A)
    assert row["score"] == t.score[t.kind == row["kind"]].max()


def test_labels_give_each_feature_its_planted_mass(planted):
    store, lmap = planted["store"], planted["lmap"]
    n = store.n_tokens("all")
    acc = Divergence(lmap, n, W_dec_b=planted["sae_b"].W_dec, labels=planted["labels"].astype(int))
    for xa, xb in store.iter_batches(4096, split="all", shuffle=False, drop_last=False, normalized=False):
        acc.update(xa, xb, None, planted["sae_b"].encode(xb, 1.0))
    fb = acc.finish().features["b"]
    share = fb.mass_label1 / fb.mass.where(fb.mass > 0)
    assert share[planted["planted_feature"]] > 0.3 > N_PLANTED / n * 20
    assert share.drop(index=planted["planted_feature"]).max() < share[planted["planted_feature"]]


def test_cli_writes_the_artifact(planted, tmp_path):
    root = planted["root"]
    out = tmp_path / "div"
    r = CliRunner().invoke(main, ["divergence", "--acts", str(root / "store"), "--map", str(root / "map"), "--out",
                                  str(out), "--sae-a", str(root / "sae_a"), "--sae-b", str(root / "sae_b"),
                                  "--top", "20", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "worst-mapped tokens" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "diffkit.Divergence" and cfg["config"]["top_tokens"] == 20
    import pandas as pd

    worst = pd.read_csv(out / "worst_tokens.csv")
    assert len(worst) == 20 and planted["labels"][worst.row.to_numpy()].all()
    assert worst.context.str.contains(r"\[\[", regex=True).all()
    feats = pd.read_csv(out / "features_b.csv")
    assert int(feats.sort_values("map_err", ascending=False).feature.iloc[0]) == planted["planted_feature"]
    tensors = load_token_scores(out)
    assert tensors["token_error_ab"].shape == (planted["store"].n_tokens("all"),)
    (out / "divergence.safetensors").write_bytes(b"damaged")
    with pytest.raises(DiffkitError, match="again"):
        load_token_scores(out)


def test_cli_bad_input_is_one_line_exit_2(planted, tmp_path):
    root = planted["root"]
    r = CliRunner().invoke(main, ["divergence", "--acts", str(root / "store"), "--map", str(tmp_path / "nomap"),
                                  "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 2 and "error:" in r.output
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide = LinearMap().fit_arrays(rng.normal(size=(400, 4)), rng.normal(size=(400, 6)))
    with pytest.raises(DiffkitError, match="--mode map"):
        Divergence(wide, 10, mode="direct")
    assert Divergence(wide, 10).mode == "map"


def test_promoted_tokens_read_a_direction_through_the_unembedding(tmp_path):
    from conftest import make_checkpoint

    from diffkit.models import load_model

    model = load_model(str(make_checkpoint(tmp_path / "m", d_model=32, seed=0)))
    W_U = model.model.W_U.detach().double().numpy()
    j = ord("q")
    out = promoted_tokens(model, W_U[:, j] * 5.0, k=5)
    assert out["up"][0]["id"] == j and out["up"][0]["token"] == "q"
    assert out["down"][0]["id"] != j
    only = promoted_tokens(model, W_U[:, j] * 5.0, k=3, vocab=np.array([j + 1, j + 2, j + 3, j + 4]))
    assert {t["id"] for t in only["up"]} <= {j + 1, j + 2, j + 3, j + 4}  # outside the store's vocabulary: never listed
