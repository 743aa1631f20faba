import json

import numpy as np
import pytest
import torch

from conftest import small_config
from diffkit.activations import collect_activations
from diffkit.errors import DiffkitError
from diffkit.models import load_checkpoint, load_model, save_checkpoint
from diffkit.tokenizer import ByteTokenizer
from hf_fixture import make_hf_dir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "tiny-llama")


def test_local_hf_directory_matches_transformers(hf_dir):
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(hf_dir))
    assert loaded.source == "hf-dir" and loaded.processing == "none"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.tensor([[0, *loaded.tokenizer.encode("hello world, again.")]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("abc de")) == "abc de"


def test_models_with_different_tokenizers_are_not_paired(hf_dir, tiny_models, tmp_path):
    cfg = small_config(tiny_models, model_b=str(hf_dir), hook_b="blocks.0.hook_resid_post", tokens=100)
    with pytest.raises(DiffkitError, match="different tokenizers"):
        collect_activations(cfg, tmp_path / "s", progress=False)


def test_checkpoint_round_trip(tiny_models, tmp_path):
    model, tok, meta = load_checkpoint(tiny_models["a"])
    save_checkpoint(model, ByteTokenizer(), tmp_path / "copy", provenance={"why": "test"})
    again, _, meta2 = load_checkpoint(tmp_path / "copy")
    ids = torch.from_numpy(np.array([[256, *tok.encode("round trip")]]))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), again(ids))
    assert meta2["provenance"] == {"why": "test"}


def test_bad_model_specs(tiny_models, tmp_path):
    with pytest.raises(DiffkitError, match="unknown model spec"):
        load_model("not-a-real-model-name")
    with pytest.raises(DiffkitError, match="unknown zoo model"):
        load_model("zoo:gigantic")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffkitError, match="neither a diffkit checkpoint"):
        load_model(str(tmp_path / "empty"))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["a"], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(DiffkitError, match="missing"):
        load_model(str(broken))
    (broken / "model.json").write_text("{")
    with pytest.raises(DiffkitError, match="not valid JSON"):
        load_model(str(broken))
    meta = json.loads((__import__("pathlib").Path(tiny_models["a"]) / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**meta, "format_version": 7}))
    with pytest.raises(DiffkitError, match="format"):
        load_model(str(broken))
