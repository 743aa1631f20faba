"""The committed zoo: real TransformerLens models and real sae-lens SAEs, loaded from disk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffkit import zoo
from diffkit.models import load_model
from diffkit.zoo.build import heldout_losses, sequence_matrix, token_activations, train_model, train_sae
from diffkit.zoo.recipes import RECIPES, SAE_RECIPE


@pytest.fixture(scope="module")
def losses():
    return {name: heldout_losses(load_model(f"zoo:{name}").model) for name in zoo.ZOO_MODELS}


def test_finetune_is_better_on_code_and_worse_on_prose(losses):
    base, ft = losses["base"], losses["finetuned"]
    assert ft["code"] < base["code"] - 0.3, losses
    assert ft["prose"] > base["prose"] + 0.1, losses


def test_seed_control_and_wide_model_learned_the_same_task(losses):
    base = losses["base"]
    for name in ("base-seed1", "wide"):
        assert abs(losses[name]["prose"] - base["prose"]) < 0.15, losses
        assert losses[name]["prose"] < base["code"], losses  # trained on prose: prose is the easier domain


def test_zoo_models_match_their_recipes():
    for name, recipe in RECIPES.items():
        cfg = load_model(f"zoo:{name}").model.cfg
        assert (cfg.d_model, cfg.n_layers, cfg.n_ctx) == (recipe.d_model, recipe.n_layers, recipe.n_ctx)


def _sae_activations(name: str):
    model = load_model(f"zoo:{name}").model
    parts = [token_activations(model, zoo.SAE_HOOK, *sequence_matrix(domain, "heldout", 128, limit=16))
             for domain in ("prose", "code")]
    return torch.cat(parts)


ZOO_SAES = [(name, 0) for name in zoo.ZOO_MODELS] + [(n, s) for n, seeds in zoo.EXTRA_SAE_SEEDS.items() for s in seeds]


@pytest.mark.parametrize("name,seed", ZOO_SAES)
def test_zoo_saes_load_through_sae_lens_and_reconstruct(name, seed):
    from sae_lens import SAE

    sae = SAE.load_from_disk(zoo.sae_dir(name, seed))
    d_model = RECIPES[name].d_model
    assert sae.cfg.d_in == d_model and sae.cfg.d_sae == SAE_RECIPE.d_sae
    assert sae.cfg.metadata.hook_name == zoo.SAE_HOOK
    acts = _sae_activations(name)
    with torch.no_grad():
        feats = sae.encode(acts)
        recon = sae.decode(feats)
    fvu = float(((acts - recon) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum())
    assert fvu < 0.4, f"held-out FVU {fvu:.3f}"
    l0 = (feats > 0).float().sum(-1)
    assert float(l0.max()) <= SAE_RECIPE.k  # TopK: never more than k active
    dead = float(((feats > 0).sum(0) == 0).float().mean())
    assert dead < 0.3, f"{dead:.0%} of latents never fire on ~4k held-out tokens"


def test_sae_lens_save_load_round_trip(tmp_path):
    from sae_lens import SAE

    sae = SAE.load_from_disk(zoo.sae_dir("base"))
    sae.save_model(tmp_path / "copy")
    again = SAE.load_from_disk(tmp_path / "copy")
    x = torch.randn(64, sae.cfg.d_in)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), again.encode(x))
    assert again.cfg.metadata.hook_name == zoo.SAE_HOOK


def test_build_recipe_runs_at_tiny_scale(tmp_path):
    """The code behind `diffkit zoo build`, shrunk: trains a model and an sae-lens SAE, saves both."""
    from sae_lens import SAE

    recipe = dataclasses.replace(RECIPES["base"], steps=4, d_model=32, n_heads=2, d_mlp=64, batch_size=4)
    model = train_model(recipe)
    stats = train_sae(model, dataclasses.replace(SAE_RECIPE, steps=3, tokens=3000, batch_size=256, d_sae=64, k=4),
                      "tiny", tmp_path / "sae")
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.d_in == 32 and sae.cfg.metadata.hook_name == SAE_RECIPE.hook
    assert stats["l0"] <= 4


def test_committed_zoo_is_small():
    total = sum(p.stat().st_size for p in zoo.ARTIFACTS.rglob("*") if p.is_file())
    # 11 MB for the original zoo, +13 MB for five organisms (fp16, ~0.95 MB each) and seven blocks.1 SAEs (~1.1 MB)
    assert total < 28 * 2**20, f"zoo artifacts are {total / 2**20:.1f} MB"


def test_zoo_info_prints_both_domains():
    from click.testing import CliRunner

    from diffkit.cli import main

    result = CliRunner().invoke(main, ["zoo", "info"])
    assert result.exit_code == 0, result.output
    assert "zoo:finetuned" in result.output and "prose" in result.output and "code" in result.output


def test_build_zoo_writes_models_saes_and_build_json(tmp_path, monkeypatch):
    """`diffkit zoo build` end to end on shrunken recipes: a model, its fine-tune, both SAEs, then --saes-only."""
    import json

    from click.testing import CliRunner
    from sae_lens import SAE

    from diffkit.cli import main
    from diffkit.models import load_checkpoint
    from diffkit.zoo import build

    tiny = dict(steps=3, d_model=32, n_heads=2, d_mlp=64, batch_size=4)
    monkeypatch.setattr(build, "RECIPES", {"base": dataclasses.replace(RECIPES["base"], **tiny),
                                           "finetuned": dataclasses.replace(RECIPES["finetuned"], **tiny)})
    monkeypatch.setattr(build, "SAE_RECIPE", dataclasses.replace(SAE_RECIPE, steps=2, tokens=2000, batch_size=128,
                                                                 d_sae=64, k=4))
    monkeypatch.setattr(build, "LAST_SAE_RECIPE", dataclasses.replace(build.LAST_SAE_RECIPE, steps=2, tokens=2000,
                                                                      batch_size=128, d_sae=64, k=4))
    result = CliRunner().invoke(main, ["zoo", "build", "base", "finetuned", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "zoo:finetuned: held-out loss" in result.output
    base_w = load_checkpoint(tmp_path / "base" / "model")[0].W_E
    ft_w = load_checkpoint(tmp_path / "finetuned" / "model")[0].W_E
    assert not torch.equal(base_w, ft_w) and torch.allclose(base_w, ft_w, atol=0.05)  # fine-tuned from base
    report = json.loads((tmp_path / "build.json").read_text())
    assert set(report) == {"base", "finetuned", "_sae_recipe", "_last_sae_recipe"} and report["base"]["sae"]["l0"] <= 4
    # ... and every one of them a blocks.1 SAE too (base: both seeds)
    assert report["base"]["sae_blocks.1_seed1"]["l0"] <= 4 and report["finetuned"]["sae_blocks.1"]["l0"] <= 4
    assert SAE.load_from_disk(tmp_path / "base" / "sae-blocks.1").cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    # base also gets its seed-1 SAE (the SAE-noise control), trained from another initialisation.
    assert report["base"]["sae_seed1"]["l0"] <= 4 and "sae_seed1" not in report["finetuned"]
    sae0, sae1 = (SAE.load_from_disk(tmp_path / "base" / d) for d in ("sae", "sae-seed1"))
    assert not torch.equal(sae0.W_dec, sae1.W_dec)
    before = (tmp_path / "base" / "model" / "model.safetensors").read_bytes()
    result = CliRunner().invoke(main, ["zoo", "build", "base", "--out", str(tmp_path), "--saes-only"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "base" / "model" / "model.safetensors").read_bytes() == before
    assert SAE.load_from_disk(tmp_path / "base" / "sae").cfg.d_in == 32
    # --hook retrains only the SAEs at that hook: blocks.0's stay byte for byte.
    block0 = (tmp_path / "base" / "sae" / "sae_weights.safetensors").read_bytes()
    result = CliRunner().invoke(main, ["zoo", "build", "base", "--out", str(tmp_path), "--saes-only",
                                       "--hook", "blocks.1.hook_resid_post"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "base" / "sae" / "sae_weights.safetensors").read_bytes() == block0
    for bad in (["--hook", "blocks.1.hook_resid_post"], ["--saes-only", "--hook", "blocks.7.hook_resid_post"]):
        result = CliRunner().invoke(main, ["zoo", "build", "base", "--out", str(tmp_path), *bad])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_sae_specs_name_zoo_saes_and_their_seeds():
    from diffkit.errors import DiffkitError
    from diffkit.saes import load_sae

    assert zoo.sae_spec_dir("zoo:base") == zoo.sae_dir("base")
    assert zoo.sae_spec_dir("zoo:base@seed1") == zoo.ARTIFACTS / "base" / "sae-seed1"
    a, b = load_sae("zoo:base"), load_sae("zoo:base@seed1")
    assert a.d_sae == b.d_sae and not torch.equal(a.W_dec, b.W_dec)
    for bad, message in (("zoo:base@seed7", "it has zoo:base, zoo:base@seed1"), ("zoo:finetuned@seed1", "it has zoo:finetuned,"),
                         ("zoo:base@7", r"zoo:NAME\[@seedN\]"), ("zoo:nope", "unknown zoo model")):
        with pytest.raises(DiffkitError, match=message):
            load_sae(bad)
