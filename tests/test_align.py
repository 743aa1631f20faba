"""The training-free diff end to end: planted ground truth, the zoo controls, bad input through the CLI."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from diffkit.activations import ActivationStore, CollectConfig, collect_activations
from diffkit.cli import main
from diffkit.diff import AlignConfig, align, format_summary, load_table
from diffkit.errors import DiffkitError
from diffkit.linear_map import LinearMap
from diffkit.metrics import auroc
from diffkit.saes import load_sae
from diffkit.zoo import SAE_HOOK, sae_dir

ZOO_TOKENS = 20_000


@pytest.fixture(scope="session")
def zoo_stores(tmp_path_factory):
    """base vs {base, base-seed1, finetuned, wide}: 20k tokens each at the zoo SAEs' hook."""
    root = tmp_path_factory.mktemp("zoo-stores")
    stores = {}
    for other in ("base", "base-seed1", "finetuned", "wide"):
        cfg = CollectConfig(model_a="zoo:base", model_b=f"zoo:{other}", hook_a=SAE_HOOK, hook_b=SAE_HOOK,
                            corpus="mixed", tokens=ZOO_TOKENS, ctx=128)
        collect_activations(cfg, root / other, progress=False)
        stores[other] = ActivationStore.open(root / other)
    return stores


def _diff(store, other, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lmap = LinearMap().fit(store)
        return align(store, load_sae(str(sae_dir("base"))), load_sae(str(sae_dir(other))), lmap,
                     AlignConfig(**{"n_contexts": 0, **cfg}))


# -- planted ground truth ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from diffkit.synthetic import PlantedConfig, make_planted, write_planted_saes, write_planted_store

    root = tmp_path_factory.mktemp("planted")
    # Different widths, noise in the activations, SAE decoders jittered off the generating directions
    # (cosine ~0.8 to the truth, as with trained SAEs), a quarter of each model's features exclusive.
    pair = make_planted(PlantedConfig(d_a=64, d_b=96, n_shared=192, n_a_only=64, n_b_only=64, noise=0.5,
                                      n_tokens=16_384, seed=1))
    write_planted_store(pair, root / "store")
    write_planted_saes(pair, root / "sae_a", root / "sae_b", jitter=0.7)
    return pair, root


def test_planted_exclusives_come_out_unmatched_or_on_top(planted):
    pair, root = planted
    store = ActivationStore.open(root / "store")
    lmap = LinearMap().fit(store)
    diff = align(store, load_sae(str(root / "sae_a")), load_sae(str(root / "sae_b")), lmap, AlignConfig(n_contexts=0))
    asg = diff.assignment
    # Exclusiveness score per feature: 2 if unmatched, else 1 − similarity of its pair (higher = more exclusive).
    score = {"a": np.full(asg.n_a, 2.0), "b": np.full(asg.n_b, 2.0)}
    score["a"][asg.pair_a[asg.matched]] = 1 - asg.similarity[asg.matched]
    score["b"][asg.pair_b[asg.matched]] = 1 - asg.similarity[asg.matched]
    label_a = np.isin(np.arange(asg.n_a), pair.a_only)
    label_b = np.isin(np.arange(asg.n_b), pair.b_only)
    value = auroc(np.concatenate([score["a"], score["b"]]), np.concatenate([label_a, label_b]))
    print(f"planted exclusives AUROC {value:.4f}")
    # Measured: AUROC 0.966 on this problem (seed 1); 1.000 with unjittered decoders.
    assert value >= 0.95, value
    # Matched pairs are the planted ones, indexed the right way round (measured: 95.8% of matched pairs).
    true_b = pair.match_a_to_b[asg.pair_a[asg.matched]]
    assert (true_b == asg.pair_b[asg.matched]).mean() >= 0.95
    table = diff.table
    a_only = table[table.kind == "a_only"]
    assert (a_only.feature_b == -1).all() and a_only.enc_norm_b.isna().all()
    assert diff.summary["counts"]["shared"] == int(asg.matched.sum()) == int((table.kind == "shared").sum())


def test_planted_rotation_exact_through_the_pipeline(tmp_path):
    """No noise, exact decoders, SAEs of different sizes (144 vs 176 features): every pair is the planted one."""
    from diffkit.synthetic import PlantedConfig, make_planted, write_planted_saes, write_planted_store

    pair = make_planted(PlantedConfig(d_a=48, d_b=48, n_shared=128, n_a_only=16, n_b_only=48, n_tokens=8192, seed=3))
    write_planted_store(pair, tmp_path / "store")
    write_planted_saes(pair, tmp_path / "a", tmp_path / "b")
    store = ActivationStore.open(tmp_path / "store")
    diff = align(store, load_sae(str(tmp_path / "a")), load_sae(str(tmp_path / "b")), LinearMap().fit(store),
                 AlignConfig(n_contexts=0))
    got = np.full(len(pair.dict_a), -1)
    asg = diff.assignment
    got[asg.pair_a[asg.matched]] = asg.pair_b[asg.matched]
    assert np.array_equal(got, pair.match_a_to_b)
    assert (asg.n_a, asg.n_b) == (144, 176) and set(asg.b_only) == set(pair.b_only)
    # Not 1: the lstsq map also regresses on A-only activity, which tilts carried directions a little.
    assert asg.similarity[asg.matched].min() > 0.9


def test_default_ranking_puts_planted_strength_changes_on_top(tmp_path):
    """16 of 128 shared features are 3x stronger in B (and all of B 2x larger). The default ranking
    (act-mass, centred) puts exactly the changed pairs first; the encoder-norm difference, the
    original method's score, cannot see them (the ground-truth benchmark found the same with
    trained sae-lens SAEs)."""
    from diffkit.synthetic import PlantedConfig, make_planted, write_planted_saes, write_planted_store

    pair = make_planted(PlantedConfig(d_a=48, d_b=48, n_shared=128, n_a_only=16, n_b_only=16, n_tokens=8192,
                                      n_changed=16, change_factor=3.0, scale_b=2.0, seed=5))
    write_planted_store(pair, tmp_path / "store")
    write_planted_saes(pair, tmp_path / "a", tmp_path / "b")
    store = ActivationStore.open(tmp_path / "store")
    diff = align(store, load_sae(str(tmp_path / "a")), load_sae(str(tmp_path / "b")), LinearMap().fit(store),
                 AlignConfig(n_contexts=0))
    assert diff.config.rank_by == "act-mass"
    shared = diff.table[diff.table.kind == "shared"]
    changed = np.isin(shared.feature_a.to_numpy(), pair.changed_a)
    assert changed.sum() == 16 and (pair.match_a_to_b[shared.feature_a] == shared.feature_b).all()
    # Measured: 13 of the top 16 changed, AUROC 0.987 (TopK interference moves a few unchanged
    # features too); enc-norm-robust 0.457; medians −1.31 (changed, log(1/3) = −1.10) and 0.05.
    top = shared.sort_values("rank").head(16)
    assert np.isin(top.feature_a.to_numpy(), pair.changed_a).mean() >= 0.75
    assert auroc(shared.act_mass_log_ratio.abs().to_numpy(), changed) >= 0.95
    # Centred: B's overall 2x is no feature difference; the changed pairs sit near log(1/3).
    assert abs(shared.act_mass_log_ratio[~changed].median()) < 0.1
    assert shared.act_mass_log_ratio[changed].median() < -0.8
    assert auroc(shared.enc_norm_diff_robust.abs().to_numpy(), changed) < 0.7


# -- the zoo ---------------------------------------------------------------------------------------

SCORES = ("enc_norm_diff", "enc_norm_diff_robust", "freq_log_ratio", "mean_act_log_ratio")


def _differences(diff) -> dict:
    """Every score's summary of 'how different': unmatched count, median |score| over pairs, median 1 − corr."""
    shared = diff.table[diff.table.kind == "shared"]
    out = {"unmatched": diff.summary["counts"]["a_only"] + diff.summary["counts"]["b_only"],
           "one_minus_corr": float((1 - shared.pair_corr).median())}
    out.update({c: float(shared[c].abs().median()) for c in SCORES})
    return out


@pytest.fixture(scope="session")
def zoo_diffs(zoo_stores):
    return {other: _diff(zoo_stores[other], other) for other in ("base", "base-seed1", "finetuned")}


def test_identical_models_show_no_difference_and_fewer_than_the_finetune(zoo_diffs):
    same, ft = _differences(zoo_diffs["base"]), _differences(zoo_diffs["finetuned"])
    asg = zoo_diffs["base"].assignment
    assert np.array_equal(asg.pair_a, asg.pair_b)  # identity: feature i pairs with feature i
    assert same["unmatched"] == 0 and same["enc_norm_diff"] < 1e-4 and same["one_minus_corr"] < 1e-4
    for key in same:
        assert same[key] < ft[key], (key, same, ft)


def test_sae_seed_control_is_below_the_finetune_on_matches_and_activations(zoo_stores, zoo_diffs):
    """The noise floor: the same model (base vs base) with its SAE retrained from another seed.

    Measured (20k tokens): 570 shared vs 541 for the fine-tune, unmatched 908 vs 966, median
    |freq log-ratio| 0.344 vs 0.387, |mean-act log-ratio| 0.379 vs 0.414, 1 − corr 0.401 vs 0.408;
    the robust encoder-norm difference is *not* below the fine-tune's (0.122 vs 0.117). Two SAEs of
    one model disagree almost as much as the SAEs of base and a short fine-tune: per-feature
    differences must be read against this floor (README, "Reading the diff").
    """
    store = zoo_stores["base"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        control = align(store, load_sae("zoo:base"), load_sae("zoo:base@seed1"), LinearMap().fit(store),
                        AlignConfig(n_contexts=0))
    noise, ft = _differences(control), _differences(zoo_diffs["finetuned"])
    assert control.summary["map"]["scores"]["a_to_b"]["heldout_fve"] > 0.999  # the same model: the map is exact
    for key in ("unmatched", "freq_log_ratio", "mean_act_log_ratio", "one_minus_corr"):
        assert noise[key] < ft[key], (key, noise, ft)
    # ...but not far below: the floor is most of the signal on this zoo.
    assert noise["unmatched"] > 0.8 * ft["unmatched"]


def test_model_seed_pair_differs_more_than_the_finetune(zoo_diffs):
    """base vs base-seed1 (another model, trained from another seed) vs base vs its 400-step fine-tune.

    Issue 3 expected the seed pair to differ less; on the zoo it is the other way round (100k
    tokens: held-out map FVE 0.58 vs 0.89, 191 vs 538 pairs at similarity ≥ 0.5, median pair
    correlation 0.39 vs 0.60): an independently trained network is a different network, while a
    short fine-tune stays close to its base. The SAE-seed control above is the noise floor.
    """
    seed, ft = zoo_diffs["base-seed1"], zoo_diffs["finetuned"]
    assert seed.summary["map"]["scores"]["a_to_b"]["heldout_fve"] < ft.summary["map"]["scores"]["a_to_b"]["heldout_fve"]
    assert seed.summary["counts"]["shared"] < ft.summary["counts"]["shared"]
    assert _differences(seed)["one_minus_corr"] > _differences(ft)["one_minus_corr"]
    # Both are far from the random-rotation chance level: the threshold calls real pairs in each.
    assert seed.summary["counts"]["shared"] >= 100 and ft.summary["counts"]["shared"] >= 300


def test_base_vs_wide_across_widths(zoo_stores):
    diff = _diff(zoo_stores["wide"], "wide", n_contexts=2)
    lmap_scores = diff.summary["map"]["scores"]
    assert lmap_scores["a_to_b"]["heldout_fve"] > 0.3 and lmap_scores["b_to_a"]["heldout_fve"] > 0.3
    assert diff.summary["counts"]["shared"] >= 50
    text = format_summary(diff)
    assert "top A-only features" in text and "[[" in text  # decoded token contexts with the token marked


def test_dense_and_sparse_solvers_agree_on_the_zoo(zoo_stores):
    store = zoo_stores["finetuned"]
    sa, sb = load_sae(str(sae_dir("base"))), load_sae(str(sae_dir("finetuned")))
    from diffkit.matching import assign

    lmap = LinearMap().fit(store)
    carried = lmap.carry_directions(sa.W_dec.double().numpy())
    dense = assign(carried, sb.W_dec.numpy(), 0.5, solver="dense")
    sparse = assign(carried, sb.W_dec.numpy(), 0.5, solver="sparse", k=128)
    assert sparse.total_cost == pytest.approx(dense.total_cost, rel=1e-6)
    assert int(sparse.matched.sum()) == int(dense.matched.sum())
    # Real SAEs (d 128, many near-ties) need a wide graph for the exact optimum: at k=64 this store
    # gave +0.0002% total cost, at the default k=32 up to +0.006% (one pair fewer above 0.5 on a
    # 100k-token store). ``solver="auto"`` uses the dense solver at this size anyway.
    close = assign(carried, sb.W_dec.numpy(), 0.5, solver="sparse", k=32)
    assert close.total_cost <= dense.total_cost * 1.001


def test_correlation_cost_and_rank_by(zoo_stores):
    diff = _diff(zoo_stores["finetuned"], "finetuned", cost="blend", blend=0.5, rank_by="corr")
    shared = diff.table[diff.table.kind == "shared"]
    assert np.all(np.diff(shared.score.to_numpy()) <= 1e-12)  # ranked by the chosen score, descending
    np.testing.assert_allclose(shared.score, 1 - shared.pair_corr)
    np.testing.assert_allclose(shared.similarity, 0.5 * shared.cosine + 0.5 * shared.pair_corr, atol=1e-5)


# -- the CLI -----------------------------------------------------------------------------------------

def _run(args):
    result = CliRunner().invoke(main, args)
    return result


def test_cli_fit_map_and_align_write_the_artifacts(zoo_stores, tmp_path):
    store = str(zoo_stores["finetuned"].root)
    res = _run(["fit-map", "--acts", store, "--out", str(tmp_path / "map"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "held-out FVE A→B" in res.output
    res = _run(["align", "--sae-a", str(sae_dir("base")), "--sae-b", str(sae_dir("finetuned")), "--acts", store,
                "--map", str(tmp_path / "map"), "--out", str(tmp_path / "diff"), "--quiet", "--rank-by", "freq"])
    assert res.exit_code == 0, res.output
    assert "top B-only features" in res.output and "shared" in res.output
    table = load_table(tmp_path / "diff")
    summary = json.loads((tmp_path / "diff" / "summary.json").read_text())
    assert len(table) == summary["counts"]["shared"] + summary["counts"]["a_only"] + summary["counts"]["b_only"]
    assert summary["counts"]["shared"] + summary["counts"]["a_only"] == 1024
    assert (tmp_path / "diff" / "features.csv").exists()
    assert json.loads((tmp_path / "diff" / "config.json").read_text())["config"]["rank_by"] == "freq"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, zoo_stores):
    root = tmp_path_factory.mktemp("bad")
    other_hook = root / "other_hook"
    shutil.copytree(sae_dir("base"), other_hook)
    cfg = json.loads((other_hook / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_post"
    (other_hook / "cfg.json").write_text(json.dumps(cfg))
    nan = root / "nan"
    shutil.copytree(sae_dir("base"), nan)
    w = load_file(str(nan / "sae_weights.safetensors"))
    w["W_enc"][0, 0] = float("nan")
    save_file(w, str(nan / "sae_weights.safetensors"))
    tiny_sae = root / "tiny.safetensors"  # 4 random features: nothing of base's SAE matches them
    gen = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(128, 4, generator=gen), "W_dec": torch.randn(4, 128, generator=gen),
               "b_enc": torch.zeros(4), "b_dec": torch.zeros(128)}, str(tiny_sae))
    (root / "tiny.json").write_text(json.dumps({"metadata": {"hook_name": SAE_HOOK}}))
    tiny_store = root / "tiny_store"
    collect_activations(CollectConfig(model_a="zoo:base", model_b="zoo:base", hook_a=SAE_HOOK, hook_b=SAE_HOOK,
                                      corpus="mixed", tokens=100, ctx=128), tiny_store, progress=False)
    (root / "empty_map").mkdir()
    return {"other_hook": str(other_hook), "nan": str(nan), "tiny_sae": str(tiny_sae), "tiny_store": str(tiny_store),
            "empty_map": str(root / "empty_map"), "store": str(zoo_stores["base-seed1"].root),
            "wide_store": str(zoo_stores["wide"].root), "out": str(root / "out")}


BASE, SEED1, WIDE = (str(sae_dir(n)) for n in ("base", "base-seed1", "wide"))


@pytest.mark.parametrize("case,args,message", [
    ("mismatched widths", ["align", "--sae-a", BASE, "--sae-b", BASE, "--acts", "{wide_store}"],
     "SAE B ({}) has d_in 128 but model B of the store has d_model 192".format(BASE)),
    ("SAE for another hook", ["align", "--sae-a", "{other_hook}", "--sae-b", SEED1, "--acts", "{store}"],
     "was trained on blocks.1.hook_resid_post, but the store holds model A's blocks.0.hook_resid_post"),
    ("NaN weights", ["align", "--sae-a", "{nan}", "--sae-b", SEED1, "--acts", "{store}"],
     "W_enc has 1 non-finite"),
    ("tiny store", ["fit-map", "--acts", "{tiny_store}"], "a map needs more tokens than dimensions"),
    ("tiny store, align", ["align", "--sae-a", BASE, "--sae-b", BASE, "--acts", "{tiny_store}"],
     "a map needs more tokens than dimensions"),
    ("nothing matches", ["align", "--sae-a", BASE, "--sae-b", "{tiny_sae}", "--acts", "{store}"],
     "no feature pair reaches similarity 0.5"),
    ("missing map file", ["align", "--sae-a", BASE, "--sae-b", SEED1, "--acts", "{store}", "--map", "{empty_map}"],
     "has no map.json"),
    ("missing store", ["fit-map", "--acts", "{out}/nowhere"], "does not exist"),
    ("ridge without alpha", ["fit-map", "--acts", "{store}", "--method", "ridge"], "ridge with --alpha 0"),
    ("bad threshold", ["align", "--sae-a", BASE, "--sae-b", SEED1, "--acts", "{store}", "--threshold", "2"],
     "--threshold is a similarity in [-1, 1]"),
])
def test_bad_input_is_a_one_line_error_with_exit_2(bad_inputs, case, args, message):
    args = [a.format(**bad_inputs) for a in args] + ["--out", bad_inputs["out"] + "/" + case.replace(" ", "_"),
                                                     "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, (case, res.output)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err


def test_library_raises_diffkit_error_for_a_map_of_other_widths(zoo_stores):
    lmap = LinearMap().fit(zoo_stores["wide"])
    with pytest.raises(DiffkitError, match="fitted for widths 128 -> 192"):
        align(zoo_stores["finetuned"], load_sae(BASE), load_sae(str(sae_dir("finetuned"))), lmap)


def test_bench_align_quick_runs(tmp_path):
    from diffkit.bench.align import run_align_benchmark
    from diffkit.bench.align_report import write_align_report

    bench = run_align_benchmark(quick=True, threads=1, log=lambda _: None)
    sparse, dense = bench.cases
    assert sparse.total_cost == pytest.approx(dense.total_cost, rel=1e-6)
    assert sparse.shared_recovered == 1.0 and sparse.a_only_unmatched == 1.0
    text = write_align_report(bench, tmp_path / "align.md").read_text()
    assert text.startswith("<!-- Generated by: diffkit bench align --quick --threads 1 -->")
