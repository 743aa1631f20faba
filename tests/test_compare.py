"""``diffkit compare`` on planted ground truth, where the right answer is known.

The planted pair (no noise, exact decoders) is one the training-free diff recovers exactly
(tests/test_align.py). Two crosscoders are compared with it: one *built* from the generating
dictionaries (a latent per planted feature, its other block zero for an exclusive one), for
which every agreement score has one right value; and one *trained* briefly, which must recover
much of the dictionary (bridge cosines near 1) without being exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffkit.activations import ActivationStore
from diffkit.cli import main
from diffkit.agreement import precision_at_k
from diffkit.compare import CompareConfig, compare, load_comparison
from diffkit.diff import AlignConfig, align, save_diff
from diffkit.errors import DiffkitError
from diffkit.linear_map import LinearMap
from diffkit.saes import load_sae
from diffkit.synthetic import PlantedConfig, make_planted, write_planted_saes, write_planted_store

CONFIG = PlantedConfig(d_a=48, d_b=48, n_shared=128, n_a_only=16, n_b_only=48, n_tokens=8192, seed=3)


def built_crosscoder(pair, store, out: Path) -> Path:
    """A real crosscoder artifact whose latents are the planted features (shared, then A-only, then B-only)."""
    from baselines.crosscoder.model import CrossCoder, CrossCoderConfig, save

    d_a, d_b = pair.dict_a.shape[1], pair.dict_b.shape[1]
    rows = [np.concatenate([pair.dict_a[i], pair.dict_b[j]]) for i, j in zip(pair.shared_a, pair.shared_b)]
    rows += [np.concatenate([pair.dict_a[i], np.zeros(d_b)]) for i in pair.a_only]
    rows += [np.concatenate([np.zeros(d_a), pair.dict_b[j]]) for j in pair.b_only]
    W = torch.tensor(np.stack(rows), dtype=torch.float32)
    cfg = CrossCoderConfig(d_in=(d_a, d_b), dict_size=len(rows), arch="l1", hooks=(store.hook("a"), store.hook("b")),
                           scale=(store.scale("a"), store.scale("b")))
    model = CrossCoder(cfg)
    with torch.no_grad():
        model.W_dec_LD.copy_(W)
        model.W_enc_LD.copy_(W)
        model.b_enc_L.zero_()
    return save(model, out)


def planted_case(root: Path, config: PlantedConfig = CONFIG) -> dict:
    """Planted store + SAEs + FeatureDiff (with its map) + the built crosscoder, under ``root``."""
    pair = make_planted(config)
    write_planted_store(pair, root / "store")
    write_planted_saes(pair, root / "sae_a", root / "sae_b")
    store = ActivationStore.open(root / "store")
    lmap = LinearMap().fit(store)
    lmap.save(root / "align" / "map")
    # The raw verdict: these tests pin the agreement arithmetic on an exact answer. (Calibrated, 2 of the 48
    # B-only features are untestable here: own-residual R² < 0.05; tests/test_calibrate.py covers calibration.)
    diff = align(store, load_sae(str(root / "sae_a")), load_sae(str(root / "sae_b")), lmap, AlignConfig(calibrate=False))
    save_diff(diff, root / "align", {"acts": str(root / "store"), "sae_a": str(root / "sae_a"),
                                     "sae_b": str(root / "sae_b"), "map": str(root / "align" / "map")})
    built_crosscoder(pair, store, root / "cc-built")
    return {"pair": pair, "root": root, "store": store}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    c = planted_case(root)
    c["built"] = compare(CompareConfig(align=str(root / "align"), crosscoder=str(root / "cc-built"),
                                       acts=str(root / "store"), out=str(root / "cmp-built")))
    return c


def test_built_crosscoder_agrees_exactly_with_the_planted_diff(case):
    pair, comp = case["pair"], case["built"]
    b = comp.bridge
    a_side, b_side = b[b.side == "a"].set_index("feature"), b[b.side == "b"].set_index("feature")
    # Every SAE feature is bridged to the latent of its own planted feature, at cosine 1.
    n_sh, n_ao = len(pair.shared_a), len(pair.a_only)
    assert (b.latent >= 0).all() and b.bridge_cos.min() > 0.9999
    assert np.array_equal(a_side.latent[pair.shared_a].to_numpy(), np.arange(n_sh))
    assert np.array_equal(a_side.latent[pair.a_only].to_numpy(), n_sh + np.arange(n_ao))
    assert np.array_equal(b_side.latent[pair.shared_b].to_numpy(), np.arange(n_sh))
    assert np.array_equal(b_side.latent[pair.b_only].to_numpy(), n_sh + n_ao + np.arange(len(pair.b_only)))
    ag = comp.summary["agreement"]
    for side, n_excl, n_feat in (("a", 16, 144), ("b", 48, 176)):
        g = ag[side]
        assert (g["bridged"], g["align_flags_bridged"], g["cc_flags_bridged"], g["both"]) == (n_feat, n_excl, n_excl,
                                                                                             n_excl)
        assert g["precision"] == 1.0 and g["recall"] == 1.0 and g["precision_at_flags"] == 1.0
        assert g["spearman_excl"] > 0.5
    assert ag["pairs"] == {**ag["pairs"], "shared": 128, "consistent": 128, "consistent_frac": 1.0}
    # SAE reconstruction: the one FVE formula, over the held-out tokens, as a one-shot computation gives it.
    from diffkit.metrics import fve

    store, rec = case["store"], comp.summary["reconstruction"]
    x_a, x_b = store.batch(np.arange(store.n_tokens("heldout")), split="heldout", normalized=False)
    for side, x in (("a", x_a), ("b", x_b)):
        sae = load_sae(str(case["root"] / f"sae_{side}")).sae
        with torch.no_grad():
            want = fve(x.numpy(), sae.decode(sae.encode(x)).double().numpy())
        assert rec["sae"][side]["tokens"] == len(x) and abs(rec["sae"][side]["fve"] - want) < 1e-6


def test_artifact_round_trips_and_records_config_and_cost(case):
    out = case["root"] / "cmp-built"
    loaded = load_comparison(out)
    assert loaded.bridge.equals(case["built"].bridge)
    cfg = json.loads((out / "compare_config.json").read_text())
    assert cfg["kind"] == "diffkit.Comparison" and cfg["config"]["bridge_threshold"] == 0.5
    cost = loaded.summary["cost"]
    d, L, n_tr = 48, 192, loaded.summary["store"]["tokens"]["train"]
    assert cost["stages"]["map_fit"]["flops"] >= 2 * n_tr * (2 * d) ** 2
    assert cost["stages"]["crosscoder_analyze"]["flops"] == 4 * loaded.summary["analysis"]["tokens"] * L * 2 * d
    assert cost["stages"]["map_fit"]["seconds"] > 0 and cost["stages"]["align"]["seconds"] > 0


def test_trained_crosscoder_recovers_much_of_the_dictionary(case, tmp_path):
    """400 steps (~3 s): nearly every SAE feature gets a latent at cosine ~1, and every feature the
    crosscoder calls exclusive is a planted exclusive that the training-free diff flags too (measured:
    142/144 and 164/176 bridged, median cosine 0.995 / 0.992, 6 and 13 crosscoder flags)."""
    from baselines.crosscoder.train import TrainConfig, train

    root, pair = case["root"], case["pair"]
    train(TrainConfig(acts=str(root / "store"), out=str(tmp_path / "cc"), dict_size=256, k=4, batch_size=512,
                      lr=3e-3, tokens=400 * 512, checkpoint_every=0), progress=False, log=lambda _: None)
    comp = compare(CompareConfig(align=str(root / "align"), crosscoder=str(tmp_path / "cc"),
                                 acts=str(root / "store"), out=str(tmp_path / "cmp")))
    for side, planted in (("a", pair.a_only), ("b", pair.b_only)):
        g = comp.summary["agreement"][side]
        bridged = comp.bridge[(comp.bridge.side == side) & (comp.bridge.latent >= 0)]
        assert g["bridged"] >= 0.9 * g["features"] and np.median(bridged.bridge_cos) > 0.98
        flagged = set(bridged.feature[bridged.cc_flag])
        assert flagged and flagged <= set(planted.tolist())
        assert g["recall"] == 1.0 and g["spearman_excl"] > 0.1  # align flags all of them


def test_precision_at_k_is_the_top_k_overlap():
    x = np.array([5.0, 4, 3, 2, 1])
    assert np.allclose(precision_at_k(x, x), 1.0)
    assert np.allclose(precision_at_k(x, -x), [0, 0, 1 / 3, 3 / 4, 1.0])


def test_bad_inputs_fail_in_one_line(case, tmp_path):
    root = case["root"]
    other = make_planted(PlantedConfig(d_a=48, d_b=40, n_shared=64, n_a_only=8, n_b_only=8, n_tokens=4096, seed=5))
    write_planted_store(other, tmp_path / "other")
    runner = CliRunner()
    base = ["compare", "--align", str(root / "align"), "--crosscoder", str(root / "cc-built"), "--acts",
            str(root / "store"), "--out", str(tmp_path / "out"), "--quiet"]

    def run(**swap) -> str:
        args = list(base)
        for key, value in swap.items():
            args[args.index(f"--{key}") + 1] = value
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and result.output.startswith("error: ")
        return result.output

    assert "was made from the store" in run(acts=str(tmp_path / "other"))
    assert "not a directory" in run(align=str(tmp_path / "nope"))
    assert "has no cfg.json" in run(crosscoder=str(tmp_path))
    built_crosscoder(other, ActivationStore.open(tmp_path / "other"), tmp_path / "cc-other")
    assert "has widths (48, 40)" in run(crosscoder=str(tmp_path / "cc-other"))
    with pytest.raises(DiffkitError, match="bridge-threshold"):
        CompareConfig(align="a", crosscoder="c", acts="s", out="o", bridge_threshold=2.0)


def test_built_crosscoder_calls_are_calibrated_like_align(case):
    """The built crosscoder's exclusive latents read one model only: the other model's residual predicts
    them worse than it predicts the shared latents, so their labels survive the null."""
    import pandas as pd

    lat = pd.read_parquet(case["root"] / "cmp-built" / "crosscoder-analysis" / "latents.parquet")
    excl = lat[lat.label.isin(["A-only", "B-only"])]
    assert len(excl) == 64 and (excl.verdict == excl.label).mean() >= 0.9
    # Not ≈ 0: this ReLU crosscoder's exclusive latents also pick up interference from shared features in
    # superposition (3 per dimension), which the other model carries; still below every shared latent's bulk.
    shared_ret = lat[lat.label == "shared"].retention
    assert shared_ret.median() > 0.8 and excl.retention.max() < shared_ret.quantile(0.05)
    cal = json.loads((case["root"] / "cmp-built" / "crosscoder-analysis" / "summary.json").read_text())["calibration"]
    assert cal["labelled"] == {"A-only": 16, "B-only": 48} and cal["sentence"].startswith(f"{cal['calls']['A-only']} A-only")
