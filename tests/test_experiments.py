"""The toy experiment series: planted cases recovered, each experiment's smallest configuration, the CLI."""

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.experiments.common import ExperimentConfig, ModelCache, run_conditions
from diffkit.experiments.data import digits, training_set
from diffkit.experiments.measures import compare
from diffkit.experiments.nets import NetSpec, latents, permuted_copy, train
from diffkit.experiments.runner import EXPERIMENTS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_net():
    spec = NetSpec(epochs=3)
    return spec, train(spec, 0)


def test_permuted_copy_is_recovered(tiny_net):
    spec, net = tiny_net
    tr, he = digits()
    perm = np.random.default_rng(7).permutation(spec.latent)
    copy = permuted_copy(net, spec, perm)
    x = torch.as_tensor(he.x)
    with torch.no_grad():
        assert torch.allclose(net(x), copy(x), atol=1e-5)  # same function
    za, zc = latents(net, tr.x), latents(copy, tr.x)
    assert np.array_equal(zc, za[:, perm])
    res = compare(za, zc, latents(net, he.x), latents(copy, he.x), mlp_steps=30)
    s = res.scores
    assert s["lin_r2_ab"] > 0.9999 and s["lin_r2_ba"] > 0.9999
    assert s["perm_r2_ab"] > 0.9999 and s["one_to_one"] == pytest.approx(1.0, abs=1e-4)
    live = np.flatnonzero((za.std(0) > 1e-8) & (latents(net, he.x).std(0) > 1e-8))
    assert len(live) >= spec.latent // 2
    # A unit perm[j] is B unit j: the assignment returns the planted permutation on every live unit
    inverse = np.argsort(perm)
    assert np.array_equal(res.perm_b[live], inverse[live])
    assert s["cca"] == pytest.approx(1.0, abs=1e-3) and s["cka"] == pytest.approx(1.0, abs=1e-9)


def test_known_rotation_is_recovered_by_the_linear_map():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    za, za_te = rng.normal(size=(1000, 8)) * np.arange(1, 9), rng.normal(size=(500, 8)) * np.arange(1, 9)
    res = compare(za, za @ q + 2.0, za_te, za_te @ q + 2.0, mlp_steps=30)
    assert np.allclose(res.lmap.W_ab_, q, atol=1e-8) and np.allclose(res.lmap.W_ba_, q.T, atol=1e-8)
    assert res.scores["lin_r2_ab"] == pytest.approx(1.0, abs=1e-10)
    assert res.scores["one_to_one"] < 0.9  # a rotation is a mixed correspondence, not a permutation
    assert res.scores["eff_dim"] == 8


def test_independent_latents_do_not_map():
    rng = np.random.default_rng(1)
    s = compare(rng.normal(size=(1000, 6)), rng.normal(size=(1000, 6)), rng.normal(size=(500, 6)),
                rng.normal(size=(500, 6)), mlp_steps=30).scores
    assert s["lin_r2_ab"] < 0.02 and s["cka"] < 0.05 and s["eff_dim"] == 0


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_smallest_configuration_of_each_experiment(name):
    """First and last condition of each experiment at the --quick size (toy part only for scale-up)."""
    module = importlib.import_module(f"diffkit.experiments.{EXPERIMENTS[name]}")
    conds = module.conditions()
    cfg = ExperimentConfig(name, reps=1, epochs=3, mlp_steps=30, quick=True)
    result = run_conditions(cfg, [conds[0], conds[-1]], ModelCache(), lambda _: None)
    assert len(result.rows) == 2
    for row in result.rows:
        assert -1.0 < row["lin_r2_ab"] <= 1.0 and -1.0 < row["lin_r2_ba"] <= 1.0
        assert 0.0 <= row["cka"] <= 1.0 + 1e-9 and 0 <= row["eff_dim"] <= 128  # hidden layers of scale-up are 128 wide
    if name == "seeds":
        assert result.rows[0]["lin_r2_ab"] > 0.9999  # the planted permuted copy


def test_data_sets():
    mix = training_set("mix:0.25", seed=3)
    assert len(mix.y) == len(training_set("digits0-4").y)
    assert abs((mix.y >= 5).mean() - 0.25) < 0.01
    assert training_set("mnist1d").x.shape[1] == 64
    with pytest.raises(DiffkitError, match="mix fraction"):
        training_set("mix:2")


def test_cli_writes_a_report_that_names_its_command(tmp_path):
    out = tmp_path / "exp"
    r = CliRunner().invoke(main, ["experiment", "width", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = (out / "width" / "report.md").read_text()
    assert report.startswith(f"<!-- Regenerate with: diffkit experiment width --out {out} --quick -->")
    assert "**Verdict.**" in report and "z8 vs z64" in report
    for fig in ("curve", "heatmaps", "pca", "wide_units"):
        assert (out / "width" / "figures" / f"{fig}.png").stat().st_size > 1000
    csv = (out / "width" / "tables" / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("# regenerate: diffkit experiment width") and csv[1].startswith("condition,")
    cfg = json.loads((out / "width" / "config.json").read_text())
    assert ExperimentConfig(**cfg["config"]) == ExperimentConfig.make("width", quick=True)
    assert "done in" in r.output


def test_cli_bad_input(tmp_path):
    r = CliRunner().invoke(main, ["experiment", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown experiment 'nope'" in r.output and "all" in r.output
    (tmp_path / "f").write_text("x")
    r = CliRunner().invoke(main, ["experiment", "seeds", "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "is a file" in r.output


def test_config_is_frozen_and_validated():
    cfg = ExperimentConfig.make("seeds", quick=False)
    with pytest.raises(Exception):
        cfg.reps = 5
    with pytest.raises(DiffkitError):
        ExperimentConfig("seeds", reps=0)


def test_experiment_command_does_not_import_torch():
    code = "import sys, diffkit.cli; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
