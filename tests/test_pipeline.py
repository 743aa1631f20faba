"""``diffkit run CONFIG.toml``: the strict config, the dry-run plan, resumption, and a tiny end-to-end run
with SAEs trained from the store (real zoo models, real sae-lens SAEs, a real crosscoder)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.pipeline.config import from_dict, load_config, packaged
from diffkit.pipeline.runner import stale_stages

TINY = """
threads = 1
[models]
a = "zoo:base"
b = "zoo:finetuned"
[data]
hook = "blocks.0.hook_resid_post"
tokens = 3000
[saes.train]
d_sae = 64
k = 8
tokens = 2560
batch_size = 128
[crosscoder]
dict_size = 128
k = 8
tokens = 4096
batch_size = 512
[compare]
tokens = 1000
"""


def _write(tmp_path, text=TINY, name="tiny.toml"):
    path = tmp_path / name
    path.write_text(f'work = "{tmp_path / "work"}"\n' + text)
    return path


@pytest.mark.parametrize("edit, key", [
    (("[data]", "[data]\ntokenz = 5"), "data.tokenz"),
    (("threads = 1", "threads = 1\nbogus = true"), "bogus"),
    (("tokens = 3000", 'tokens = "3000"'), "data.tokens"),
    (("d_sae = 64", "d_sae = 6.5"), "saes.train.d_sae"),
    (("k = 8\ntokens", "k = 80\ntokens"), "saes.train.k"),
    (('k = 8\ntokens', 'k = 8\narch = "relu"\ntokens'), "saes.train.arch"),
    (("[compare]", "[compare]\n[compare.x]"), "compare.x"),
    (('a = "zoo:base"', 'a = "zoo:base"\nc = 1'), "models.c"),
])
def test_strict_config_errors_name_the_key(tmp_path, edit, key):
    path = _write(tmp_path, TINY.replace(*edit, 1))
    with pytest.raises(DiffkitError) as err:
        load_config(path)
    assert f"config key {key!r}" in str(err.value) and "\n" not in str(err.value)
    res = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert res.exit_code == 2 and "Traceback" not in res.output and key in res.output


def test_config_defaults_types_and_missing_file(tmp_path):
    cfg = load_config(_write(tmp_path))
    assert cfg.data.tokens == 3000 and cfg.saes.a == "train" and cfg.crosscoder.lr == 1e-3
    assert cfg.out == str(tmp_path / "work" / "report")
    assert from_dict(json.loads(json.dumps(cfg.to_json()))) == cfg  # the saved JSON reads back to the same config
    assert load_config(_write(tmp_path, TINY.replace("lr", "lr")), {"crosscoder.lr": 2}).crosscoder.lr == 2.0
    with pytest.raises(DiffkitError, match="models.b"):
        from_dict({"models": {"a": "zoo:base"}, "data": {"hook": "h"}})
    with pytest.raises(DiffkitError, match="not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[data\n")
    with pytest.raises(DiffkitError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    for name in ("demo", "example"):  # the shipped configs are valid
        assert load_config(packaged(name)).models.a == "zoo:base"


def test_dry_run_prints_the_plan_and_sizes(tmp_path):
    path = _write(tmp_path)
    res = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    # two stores (the diff and A vs A for the SAE-seed control) of 3,000 x (128 + 128) float32 values
    assert res.output.count("3,000 tokens") == 2 and "-> 3.1MB" in res.output
    assert "SAE null      train topk d_sae 64, k 8, 2,560 samples (batch 128), seed 1" in res.output
    assert "seed 1, 16.6k params" in res.output  # 2 d d_sae + d_sae + d = 2 * 128 * 64 + 64 + 128 = 16,576
    assert "runs        diff, sae-seed control" in res.output and "collect (to run)" in res.output
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


def test_help_and_dry_run_load_no_model(tmp_path):
    """The plan reads widths from the models' config files: no torch, no model loaded; --help has an example."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from diffkit.cli import main; "
            f"r = CliRunner().invoke(main, ['run', {str(_write(tmp_path))!r}, '--dry-run']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('torch', 'transformer_lens', 'sae_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    res = CliRunner().invoke(main, ["run", "--help"])
    assert res.exit_code == 0 and "diffkit run my.toml --dry-run" in res.output and "example.toml" in res.output


def test_stale_stages_follow_the_data_flow():
    cfg = from_dict({"models": {"a": "zoo:base", "b": "zoo:finetuned"}, "data": {"hook": "blocks.0.hook_resid_post"}})
    assert stale_stages(cfg, replace(cfg, threads=1, device="cuda", out="elsewhere")) == []
    assert stale_stages(cfg, replace(cfg, crosscoder=replace(cfg.crosscoder, k=4))) == ["crosscoder", "compare", "answer"]
    assert stale_stages(cfg, replace(cfg, saes=replace(cfg.saes, null="zoo:base@seed1"))) == ["saes", "align",
                                                                                              "compare", "answer"]
    assert stale_stages(cfg, replace(cfg, data=replace(cfg.data, tokens=5))) == \
        ["collect", "saes", "map", "align", "crosscoder", "compare", "answer"]
    assert stale_stages(cfg, replace(cfg, report=replace(cfg.report, losses=True))) == ["losses"]
    assert stale_stages(cfg, replace(cfg, report=replace(cfg.report, title="t"))) == []


def test_tiny_config_end_to_end_then_resume(tmp_path):
    from sae_lens import SAE

    path = _write(tmp_path)
    work = tmp_path / "work"
    res = CliRunner().invoke(main, ["run", str(path), "--quiet"])
    assert res.exit_code == 0, res.output
    # three SAEs trained from the store, in sae-lens's format with the store's hook
    saes = {r: SAE.load_from_disk(str(work / f"sae-{r}")) for r in ("a", "b", "null")}
    assert all(s.cfg.d_sae == 64 and s.cfg.metadata.hook_name == "blocks.0.hook_resid_post" for s in saes.values())
    assert float((saes["a"].W_dec - saes["null"].W_dec).abs().max()) > 0  # another seed, another SAE
    marks = {p.stem: json.loads(p.read_text()) for p in (work / "stages").glob("*.json")}
    assert set(marks) == {"collect", "saes", "map", "align", "crosscoder", "compare"}
    assert marks["saes"]["null"]["seed"] == 1 and marks["saes"]["a"]["seed"] == 0
    # the SAE-seed control runs on the A vs A store: its map is exact (held-out FVE 1.000 both ways)
    text = (work / "report" / "report.md").read_text()
    assert "| sae-seed control | 1.000 | 1.000 |" in text and "**Noise floor of the training-free diff.**" in text
    assert json.loads((work / "config.json").read_text())["saes"]["train"]["d_sae"] == 64

    # a second run keeps every stage; a changed crosscoder option reruns only the crosscoder and compare
    stamp = {p: p.stat().st_mtime_ns for p in (work / "sae-a", work / "store-diff" / "manifest.json")}
    res = CliRunner().invoke(main, ["run", str(path), "--quiet"])
    assert res.exit_code == 0 and res.output.count("done earlier") == 6
    # the report written from the stage markers (keys sorted on disk) keeps the tables' column order
    assert "| store | model A | model B | tokens | train | held-out |" in (work / "report" / "report.md").read_text()
    path.write_text(path.read_text().replace("dict_size = 128\nk = 8", "dict_size = 128\nk = 4"))
    res = CliRunner().invoke(main, ["run", str(path), "--quiet"])
    assert "rerunning crosscoder, compare" in res.output
    kept = [line.split("] ")[1].split(":")[0] for line in res.output.splitlines() if "done earlier" in line]
    assert kept == ["collect", "saes", "map", "align"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert json.loads((work / "crosscoder-diff" / "train_config.json").read_text())["k"] == 4

    # a saes stage interrupted after its SAEs were written: they are kept (same options, newer than the store),
    # and the stages after it run again
    (work / "stages" / "saes.json").unlink()
    res = CliRunner().invoke(main, ["run", str(path), "--quiet"])
    kept = [line.split("] ")[1].split(":")[0] for line in res.output.splitlines() if "done earlier" in line]
    assert res.exit_code == 0 and kept == ["collect", "map", "crosscoder"] and "[4/7] align" in res.output
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


GIVEN = """
threads = 1
[data]
store = "{store}"
[saes.train]
d_sae = 48
k = 4
tokens = 5120
batch_size = 256
normalize = false
[crosscoder]
dict_size = 96
k = 8
tokens = 8192
batch_size = 512
[compare]
tokens = 2000
"""


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    """A small planted pair written as a store: activations diffkit did not collect (as `store import` makes)."""
    from diffkit.synthetic import make_planted, planted_config, write_planted_store

    root = tmp_path_factory.mktemp("given")
    write_planted_store(make_planted(planted_config(d=16, superposition=2.0, n_tokens=8192, ctx=64)), root / "store")
    return root / "store"


@pytest.mark.parametrize("extra, key", [
    ("[data]\ntokens = 5", "data.tokens"), ('[models]\nb = "finetune"', "models.b"),
    ("[report]\nlosses = true", "report.losses"), ('[controls]\nmodel_seed = "zoo:base-seed1"', "controls.model_seed"),
    ('[compare]\nsplit = "test"', "compare.split"),
])
def test_a_given_store_refuses_what_only_collecting_makes(tmp_path, planted_store, extra, key):
    text = GIVEN.format(store=planted_store)
    section = extra.split("\n")[0]
    text = text.replace(section, extra, 1) if section in text else text + extra + "\n"
    res = CliRunner().invoke(main, ["run", str(_write(tmp_path, text)), "--dry-run"])
    assert res.exit_code == 2 and f"config key {key!r}" in res.output and "Traceback" not in res.output, res.output


def test_a_given_store_end_to_end(tmp_path, planted_store):
    """data.store: nothing collected; the models are the store's names; the null SAE still calibrates the diff
    (there is no A vs A store to run the SAE-seed control on); a wrong data.hook is a one-line error."""
    path = _write(tmp_path, GIVEN.format(store=planted_store))
    work = tmp_path / "work"
    plan = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert plan.exit_code == 0 and "planted:a vs planted:b" in plan.output and "given" in plan.output, plan.output
    assert "runs        diff;" in plan.output and "SAE null" in plan.output
    res = CliRunner().invoke(main, ["run", str(path), "--quiet"])
    assert res.exit_code == 0, res.output
    assert not any(work.glob("store-*"))  # read in place
    marks = {p.stem: json.loads(p.read_text()) for p in (work / "stages").glob("*.json")}
    assert marks["collect"]["stores"][0]["tokens"] == 8192 and marks["collect"]["stores"][0]["model A"] == "planted:a"
    assert set(marks["align"]) - {"seconds"} == {"diff"} and marks["saes"]["null"]["seed"] == 1
    summary = json.loads((work / "align-diff" / "summary.json").read_text())
    assert "SAE-seed null" in summary["calibration"]["null_changed"], summary["calibration"]
    text = (work / "report" / "report.md").read_text()
    assert f"given: `{planted_store}`" in text
    bad = CliRunner().invoke(main, ["run", str(_write(tmp_path, GIVEN.format(store=planted_store).replace(
        "[data]", '[data]\nhook = "blocks.3.hook_resid_post"'))), "--quiet"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "data.hook" in bad.output, bad.output
    assert {p.stem for p in (work / "stages").glob("*.json")} == set(marks)  # checked before a marker is dropped
