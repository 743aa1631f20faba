"""SAE specs load through sae-lens's own API and are checked against the store."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffkit.errors import DiffkitError
from diffkit.saes import check_against_store, load_sae
from diffkit.zoo import sae_dir


def test_zoo_sae_dir_loads_and_encodes_like_sae_lens():
    from sae_lens import SAE

    loaded = load_sae(str(sae_dir("base")))
    assert (loaded.d_in, loaded.d_sae, loaded.architecture) == (128, 1024, "topk")
    assert loaded.hook_name == "blocks.0.hook_resid_post" and loaded.source == "sae-lens dir"
    x = torch.randn(64, 128) * 3
    ref = SAE.load_from_disk(str(sae_dir("base"))).encode(x)
    feats = loaded.encode(x, scale=1.7)  # scale unused: this SAE reads raw activations
    torch.testing.assert_close(feats, ref)
    assert int((feats > 0).sum(1).max()) == 24  # TopK k honoured


def _plain_copy(tmp_path, with_threshold=None):
    tensors = load_file(str(sae_dir("base") / "sae_weights.safetensors"))
    cfg = {"d_in": 128, "d_sae": 1024, "metadata": {"hook_name": "blocks.0.hook_resid_post"}}
    if with_threshold is not None:
        tensors["threshold"] = torch.full((1024,), with_threshold)
        cfg["architecture"] = "jumprelu"
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    (tmp_path / "plain.json").write_text(json.dumps(cfg))
    return path, tensors


def test_plain_safetensors_standard_and_jumprelu(tmp_path):
    path, tensors = _plain_copy(tmp_path)
    std = load_sae(str(path))
    assert std.architecture == "standard" and std.source == "safetensors"
    x = torch.randn(32, 128)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    torch.testing.assert_close(std.encode(x, 1.0), torch.relu(pre))

    jdir = tmp_path / "j"
    jdir.mkdir()
    path, tensors = _plain_copy(jdir, with_threshold=0.3)
    jump = load_sae(str(path))
    assert jump.architecture == "jumprelu"
    feats = jump.encode(x, 1.0)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    torch.testing.assert_close(feats, pre * (pre > 0.3))  # the threshold, not ReLU, decides
    assert bool(((pre > 0) & (pre <= 0.3)).any())  # and it matters on this input


def test_expected_average_only_in_scales_inputs_with_the_store_scale(tmp_path):
    from sae_lens import SAE

    d = tmp_path / "scaled"
    shutil.copytree(sae_dir("base"), d)
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (d / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(str(d))
    x = torch.randn(16, 128)
    ref = SAE.load_from_disk(str(d)).encode(x * 2.5)
    torch.testing.assert_close(loaded.encode(x, scale=2.5), ref)


def test_bad_specs_are_one_line_errors(tmp_path):
    d = tmp_path / "nan"
    shutil.copytree(sae_dir("base"), d)
    w = load_file(str(d / "sae_weights.safetensors"))
    w["W_dec"][3, 5] = float("nan")
    save_file(w, str(d / "sae_weights.safetensors"))
    with pytest.raises(DiffkitError, match="W_dec has 1 non-finite"):
        load_sae(str(d))
    with pytest.raises(DiffkitError, match="does not exist"):
        load_sae(str(tmp_path / "nowhere"))
    with pytest.raises(DiffkitError, match="neither a local path nor a release"):
        load_sae("no-such-release/layer_0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffkitError, match="has no cfg.json"):
        load_sae(str(tmp_path / "empty"))
    lone = tmp_path / "lone" / "w.safetensors"
    lone.parent.mkdir()
    save_file({"W_enc": torch.zeros(4, 8)}, str(lone))
    with pytest.raises(DiffkitError, match="no JSON config"):
        load_sae(str(lone))
    (lone.parent / "w.json").write_text("{}")
    with pytest.raises(DiffkitError, match="lacks W_dec, b_enc, b_dec"):
        load_sae(str(lone))


def test_registry_lookup_is_real_and_offline_errors_are_clear():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release = next(iter(get_pretrained_saes_directory()))
    with pytest.raises(DiffkitError, match=f"release '{release}' has no SAE"):
        load_sae(f"{release}/definitely-not-an-sae-id")


def test_checks_against_the_store(small_store, tmp_path):
    sae = load_sae(str(sae_dir("base")))  # d_in 128; the small store's models are 32 and 48 wide
    with pytest.raises(DiffkitError, match="d_in 128 but model A of the store has d_model 32"):
        check_against_store(sae, small_store, "a")
    path, _ = _plain_copy(tmp_path)
    small = {"W_enc": torch.randn(32, 64), "W_dec": torch.randn(64, 32), "b_enc": torch.zeros(64),
             "b_dec": torch.zeros(32)}
    save_file(small, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps({"metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    with pytest.raises(DiffkitError, match="trained on blocks.1.hook_resid_post, but the store holds model A's "
                                           "blocks.0.hook_resid_post"):
        check_against_store(load_sae(str(tmp_path / "s.safetensors")), small_store, "a")
    (tmp_path / "s.json").write_text("{}")
    with pytest.warns(UserWarning, match="records no hook name"):
        notes = check_against_store(load_sae(str(tmp_path / "s.safetensors")), small_store, "a")
    assert len(notes) == 1
    assert np.isfinite(load_sae(str(tmp_path / "s.safetensors")).W_dec.numpy()).all()
