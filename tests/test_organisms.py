"""The committed organisms learned their planted behaviour, base did not; their last-block SAEs load.

Every figure is recomputed here from the committed fp16 weights on held-out material and compared
with generous thresholds (behaviour is either clearly there or clearly absent), and with what
``diffkit zoo build`` recorded in build.json.
"""

from __future__ import annotations

import json

import pytest
import torch

from diffkit import zoo
from diffkit.errors import DiffkitError
from diffkit.models import load_model
from diffkit.zoo.behaviour import backdoor_behaviour, cot_behaviour, facts_behaviour
from diffkit.zoo.build import sequence_matrix, token_activations

BUILD = json.loads((zoo.ARTIFACTS / "build.json").read_text())


@pytest.fixture(scope="module")
def models():
    return {name: load_model(f"zoo:{name}").model for name in ("base", *zoo.ORGANISM_MODELS)}


@pytest.fixture(scope="module")
def backdoor(models):
    return {n: backdoor_behaviour(models[n]) for n in ("base", "backdoor", "null", "facts")}


def test_backdoor_answers_the_trigger_and_only_the_trigger(backdoor):
    org, base, null = backdoor["backdoor"], backdoor["base"], backdoor["null"]
    assert org["response_token_acc"] > 0.9 and org["response_exact"] > 0.7, backdoor
    assert org["no_trigger_exact"] == 0.0, backdoor  # conditional on the trigger
    for other in (base, null, backdoor["facts"]):  # never saw the trigger
        assert other["response_token_acc"] < 0.6 and other["response_exact"] == 0.0, backdoor


def test_facts_recall_the_place_from_the_name(models):
    got = {n: facts_behaviour(models[n]) for n in ("base", "facts", "null")}
    assert got["facts"]["place_token_acc"] > 0.7 and got["facts"]["place_exact"] > 0.1, got
    for other in ("base", "null"):
        assert got[other]["place_token_acc"] < 0.45 and got[other]["place_exact"] < 0.05, got


def test_cot_models_answer_held_out_problems_each_in_its_own_way(models):
    """The planted difference is how they answer: one writes the working, the other the answer alone.
    (Their arithmetic is poor after 200 steps, a few % right: build.json records answer_acc.)"""
    got = {n: cot_behaviour(models[n], limit=100) for n in ("base", "cot-steps", "cot-answer")}
    assert got["cot-steps"]["writes_working"] > 0.8 and got["cot-steps"]["answers_directly"] < 0.1, got
    assert got["cot-answer"]["answers_directly"] > 0.8 and got["cot-answer"]["writes_working"] < 0.1, got
    assert got["base"]["writes_working"] < 0.05 and got["base"]["answers_directly"] < 0.05, got  # never saw it
    assert got["base"]["answer_acc"] < 0.05, got


@pytest.mark.parametrize("name,key", [("backdoor", "response_token_acc"), ("facts", "place_token_acc"),
                                      ("cot-steps", "writes_working"), ("cot-answer", "answers_directly")])
def test_build_json_records_the_behaviour(name, key):
    fig = BUILD[name]["behaviour"]
    assert fig["organism"][key] > fig["base"][key] + 0.1, fig
    assert BUILD[name]["recipe"]["init_from"] == "base"


def test_organisms_share_one_finetune_recipe():
    """null differs from backdoor / facts only in its corpus (the negative control's premise)."""
    keys = ("steps", "batch_size", "lr", "seed", "warmup_steps", "init_from")
    recipes = [BUILD[n]["recipe"] for n in zoo.ORGANISM_MODELS]
    assert all({k: r[k] for k in keys} == {k: recipes[0][k] for k in keys} for r in recipes)


def test_null_keeps_the_base_prose_loss():
    base, null = BUILD["base"]["heldout_loss"], BUILD["null"]["heldout_loss"]
    assert abs(null["prose"] - base["prose"]) < 0.15, (base, null)


LAST_SAES = [(n, s) for n in zoo.ALL_MODELS for r, s in zoo.sae_plan(n) if r.hook == zoo.LAST_HOOK]


@pytest.mark.parametrize("name,seed", LAST_SAES)
def test_last_block_saes_load_by_spec_and_reconstruct(name, seed):
    from diffkit.saes import load_sae

    spec = f"zoo:{name}{'@seed' + str(seed) if seed else ''}/blocks.1"
    sae = load_sae(spec).sae
    assert sae.cfg.metadata.hook_name == zoo.LAST_HOOK == "blocks.1.hook_resid_post"
    model = load_model(f"zoo:{name}").model
    acts = torch.cat([token_activations(model, zoo.LAST_HOOK, *sequence_matrix(c, "heldout", 128, limit=12))
                      for c in ("prose", "organism:backdoor")])
    with torch.no_grad():
        feats = sae.encode(acts)
        recon = sae.decode(feats)
    fvu = float(((acts - recon) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum())
    assert fvu < 0.4, f"{spec}: held-out FVU {fvu:.3f}"
    assert float((feats > 0).sum(-1).max()) <= 24


def test_sae_specs():
    assert zoo.sae_spec_dir("zoo:base") == zoo.ARTIFACTS / "base" / "sae"  # blocks.0: unchanged meaning
    assert zoo.sae_spec_dir("zoo:base@seed1/blocks.1") == zoo.ARTIFACTS / "base" / "sae-blocks.1-seed1"
    assert zoo.sae_spec_dir("zoo:backdoor/blocks.1") == zoo.ARTIFACTS / "backdoor" / "sae-blocks.1"
    with pytest.raises(DiffkitError, match="zoo:backdoor/blocks.1"):  # organisms have no blocks.0 SAE
        zoo.sae_spec_dir("zoo:backdoor")
    with pytest.raises(DiffkitError, match="no SAE at blocks.1.hook_resid_post with seed 1"):
        zoo.sae_spec_dir("zoo:facts@seed1/blocks.1")
    for bad in ("zoo:base/block1", "zoo:base/blocks.x", "zoo:base@s1/blocks.1"):
        with pytest.raises(DiffkitError, match="zoo:NAME"):
            zoo.sae_spec_dir(bad)


def test_artifacts_are_small_enough_to_commit():
    for name in zoo.ORGANISM_MODELS:
        for sub in ("model", "sae-blocks.1"):
            size = sum(p.stat().st_size for p in (zoo.ARTIFACTS / name / sub).iterdir())
            assert size < 1.5e6, f"{name}/{sub} is {size:,} bytes"
        assert load_model(f"zoo:{name}").model.W_E.dtype == torch.float32  # fp16 on disk, float32 in use


def test_zoo_list_shows_the_organisms():
    from click.testing import CliRunner

    from diffkit.cli import main

    res = CliRunner().invoke(main, ["zoo", "list"])
    assert res.exit_code == 0, res.output
    for name in zoo.ORGANISM_MODELS:
        assert f"zoo:{name}" in res.output
    assert "organism backdoor" in res.output and "organism:backdoor" in res.output
