"""Crosscoder analysis: planted exclusive features come out A-only / B-only (AUROC), the table and CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from baselines.crosscoder import load
from baselines.crosscoder.analysis import cca_of_samples, relative_norms, sharedness
from baselines.crosscoder.train import TrainConfig, train
from diffkit.cli import main


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count one half (Mann-Whitney U / n_pos n_neg)."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from diffkit.synthetic import PlantedConfig, make_planted, write_planted_store

    root = tmp_path_factory.mktemp("planted_cc")
    pair = make_planted(PlantedConfig(d_a=32, d_b=32, n_shared=48, n_a_only=16, n_b_only=16, k=3, n_tokens=32768))
    write_planted_store(pair, root / "store")
    train(TrainConfig(acts=str(root / "store"), out=str(root / "cc"), dict_size=256, k=3, batch_size=512,
                      tokens=512 * 500, lr=3e-3, log_every=100, checkpoint_every=0, dead_after_tokens=20000,
                      dec_init_norm=0.5), progress=False)
    res = CliRunner().invoke(main, ["crosscoder", "analyze", "--crosscoder", str(root / "cc"), "--acts",
                                    str(root / "store"), "--out", str(root / "an"), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return pair, root, res.output


def test_planted_exclusive_features_are_labelled_and_shared_ones_shared(planted):
    pair, root, printed = planted
    table = pd.read_parquet(root / "an" / "latents.parquet")
    model = load(root / "cc")
    W_a, W_b = (torch.nn.functional.normalize(w.detach(), dim=1) for w in model.split(model.W_dec_LD))

    def best(dirs, W):  # the crosscoder latent whose decoder block is closest to each planted direction
        cos = torch.nn.functional.normalize(torch.tensor(dirs), dim=1) @ W.T
        return cos.max(1)

    cos_a, lat_a = best(pair.dict_a, W_a)
    cos_b, lat_b = best(pair.dict_b, W_b)
    assert float(cos_a.median()) > 0.95 and float(cos_b.median()) > 0.95  # the features are recovered
    r = table["rel_norm_r_b"].to_numpy()
    r_shared = r[lat_a[pair.shared_a].numpy()]
    r_a_only = r[lat_a[pair.a_only].numpy()]
    r_b_only = r[lat_b[pair.b_only].numpy()]
    auc_b = auroc(r_b_only, np.concatenate([r_shared, r_a_only]))
    auc_a = auroc(1 - r_a_only, np.concatenate([1 - r_shared, 1 - r_b_only]))
    print(f"planted: AUROC B-only {auc_b:.3f}, A-only {auc_a:.3f} (score r = n_B/(n_A+n_B))")
    assert auc_a >= 0.95 and auc_b >= 0.95
    labels = table["label"].to_numpy()
    assert (labels[lat_a[pair.shared_a].numpy()] == "shared").mean() >= 0.9
    assert (labels[lat_a[pair.a_only].numpy()] == "A-only").mean() >= 0.7
    assert (labels[lat_b[pair.b_only].numpy()] == "B-only").mean() >= 0.7
    # Latent Scaling: a truly B-only latent explains (almost) nothing of A's reconstruction error
    nu = table.loc[lat_b[pair.b_only].numpy()].query("label == 'B-only'")["nu_err"].to_numpy()
    assert np.nanmedian(np.abs(nu)) < 0.2


def test_analysis_table_summary_and_printout(planted):
    pair, root, printed = planted
    table = pd.read_csv(root / "an" / "latents.csv")
    for col in ("latent", "label", "dead", "dec_norm_a", "dec_norm_b", "rel_norm_r_b", "rel_norm_delta_b",
                "dec_cos_ab", "freq", "mean_act", "mean_act_active", "beta_rec_a", "beta_rec_b", "beta_err_a",
                "beta_err_b", "nu_rec", "nu_err"):
        assert col in table.columns
    assert len(table) == 256 and set(table["label"]) <= {"A-only", "B-only", "shared", "intermediate", "dead"}
    assert table.loc[table.label == "shared", "beta_err_a"].isna().all()  # β only for exclusive latents
    s = json.loads((root / "an" / "summary.json").read_text())
    assert s["fve_a"] > 0.7 and s["fve_b"] > 0.7 and 0 < s["l0"] < 10
    assert sum(s["counts"].values()) == 256 and s["top"]["A-only"] and s["top"]["B-only"]
    assert s["top"]["B-only"][0]["contexts"] and "«" in s["top"]["B-only"][0]["contexts"][0]["text"]
    assert 0 < s["sharedness"] < 1 and 0 < s["cca_activations"] <= 1
    assert "FVE A" in printed and "sharedness" in printed


def test_scores_are_one_for_identical_models_and_conventions_agree():
    torch.manual_seed(0)  # the global RNG's state otherwise depends on which tests ran before
    x = torch.randn(500, 6)
    assert cca_of_samples(x, x) == pytest.approx(1.0, abs=1e-4)
    assert cca_of_samples(x, x @ torch.randn(6, 6)) == pytest.approx(1.0, abs=1e-4)  # invariant to linear maps
    assert cca_of_samples(x, torch.randn(500, 6)) < 0.2
    assert sharedness(torch.full((10,), 0.5), torch.rand(10)) == pytest.approx(1.0)
    assert sharedness(torch.tensor([0.0, 1.0]), torch.ones(2)) == 0.0
    r, delta = relative_norms(torch.tensor([1.0, 1.0, 0.0, 0.9]), torch.tensor([0.0, 1.0, 1.0, 0.1]))
    assert r.tolist() == pytest.approx([0.0, 0.5, 1.0, 0.1]) and delta.tolist() == pytest.approx([0.0, 0.5, 1.0, 1 / 18])


def test_analyze_cross_width_store_and_bad_input(small_store, tmp_path):
    cc = tmp_path / "cc"
    train(TrainConfig(acts=str(small_store.root), out=str(cc), dict_size=64, k=4, batch_size=256, tokens=256 * 4,
                      checkpoint_every=0), progress=False)
    res = CliRunner().invoke(main, ["crosscoder", "analyze", "--crosscoder", str(cc), "--acts", str(small_store.root),
                                    "--out", str(tmp_path / "an"), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert "LinearMap" in s["dec_cos_method"]  # widths 32 and 48: cosine through the fitted map
    cos = pd.read_parquet(tmp_path / "an" / "latents.parquet")["dec_cos_ab"]
    assert cos.notna().all() and cos.between(-1, 1).all()
    res = CliRunner().invoke(main, ["crosscoder", "analyze", "--crosscoder", str(tmp_path), "--acts",
                                    str(small_store.root), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "not a crosscoder" in res.output
