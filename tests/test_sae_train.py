"""diffkit sae train: sae-lens's own trainer on a store, saved in sae-lens's format, resumable, atomic."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.sae_train import SAETrainConfig, partial_dir, store_batch_stream, train_sae, train_sae_from_store

SMALL = dict(d_sae=256, k=16, tokens=256 * 40, batch_size=256, warmup_steps=4, checkpoint_every=10)


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory):
    """8,000 tokens of zoo:base vs zoo:finetuned at blocks.0 (a few seconds)."""
    from diffkit.activations import ActivationStore, CollectConfig, collect_activations

    out = tmp_path_factory.mktemp("zoo") / "store"
    cfg = CollectConfig(model_a="zoo:base", model_b="zoo:finetuned", hook_a="blocks.0.hook_resid_post",
                        hook_b="blocks.0.hook_resid_post", corpus="mixed", tokens=8000)
    collect_activations(cfg, out, progress=False)
    return ActivationStore.open(out)


@pytest.fixture(scope="module")
def trained(zoo_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    cfg = SAETrainConfig(**SMALL)
    recs = {src: train_sae_from_store(zoo_store, src, cfg, root / f"sae-{src}", progress=False) for src in "ab"}
    return root, recs


def test_trained_sae_loads_in_sae_lens_and_diffkit_alike(zoo_store, trained):
    from sae_lens import SAE

    from diffkit.saes import check_against_store, load_sae

    root, recs = trained
    ref = SAE.load_from_disk(str(root / "sae-a"))
    ours = load_sae(str(root / "sae-a"))
    assert ours.hook_name == "blocks.0.hook_resid_post" == ref.cfg.metadata.hook_name
    assert ref.cfg.normalize_activations == "none"  # the store's scale is folded in: the SAE reads raw activations
    meta = json.loads((root / "sae-a" / "cfg.json").read_text())["metadata"]
    assert meta["diffkit_normalization"]["scale"] == pytest.approx(zoo_store.scale("a"))
    assert meta["model_name"] == "zoo:base"
    check_against_store(ours, zoo_store, "a")
    x, _ = zoo_store.batch(range(64), split="heldout", normalized=False)
    torch.testing.assert_close(ours.encode(x, zoo_store.scale("a")), ref.encode(x))
    assert int((ref.encode(x) > 0).sum(1).max()) == 16
    m = recs["a"]["metrics"]
    assert all(recs["a"][k] == m[k] for k in ("fve", "l0", "dead_fraction"))  # also at the top level
    assert m["eval_tokens"] == zoo_store.n_tokens("heldout") and recs["a"]["inputs"]["eval_split"] == "heldout"
    assert m["l0"] == pytest.approx(16.0) and 0 <= m["dead_fraction"] < 0.5
    # an untrained SAE of the same shape explains far less of the held-out variance than the trained one
    from diffkit.sae_train import build_training_sae, evaluate_sae

    fresh = evaluate_sae(build_training_sae(SAETrainConfig(**SMALL), 128), [x])
    assert m["fve"] > 0.4 > fresh["fve"]
    saved = json.loads((root / "sae-a" / "sae_train.json").read_text())
    assert saved["config"] == {**SAETrainConfig(**SMALL).__dict__} and saved["metrics"] == m


def test_align_reads_the_trained_saes(zoo_store, trained, tmp_path):
    root, _ = trained
    res = CliRunner().invoke(main, ["align", "--sae-a", str(root / "sae-a"), "--sae-b", str(root / "sae-b"),
                                    "--acts", str(zoo_store.root), "--out", str(tmp_path / "align"), "--quiet",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "align" / "features.csv")
    assert set(table.feature_a[table.feature_a >= 0]) == set(range(256))  # every trained latent took part
    assert set(table.feature_b[table.feature_b >= 0]) == set(range(256))
    assert (table.kind == "shared").sum() > 64  # A and B are one fine-tune apart: most latents pair up


def test_normalized_training_equals_raw_training_on_scaled_inputs(zoo_store, tmp_path):
    """The fold is exact: an SAE trained on x*s (raw path, fed scaled batches) reconstructs s*x as the
    normalized-and-folded SAE reconstructs x, times s."""
    from diffkit.saes import load_sae

    s = zoo_store.scale("a")
    cfg = SAETrainConfig(**{**SMALL, "tokens": 256 * 15})
    train_sae_from_store(zoo_store, "a", cfg, tmp_path / "norm", progress=False)
    stream = store_batch_stream(zoo_store, "a", cfg.batch_size, cfg.seed)
    train_sae(lambda start: (b * s for b in stream(start)), 128, SAETrainConfig(**{**cfg.__dict__, "normalize": False}),
              tmp_path / "raw", "blocks.0.hook_resid_post", progress=False)
    folded, scaled = load_sae(str(tmp_path / "norm")).sae, load_sae(str(tmp_path / "raw")).sae
    x, _ = zoo_store.batch(range(128), split="heldout", normalized=False)
    with torch.no_grad():
        torch.testing.assert_close(folded.decode(folded.encode(x)) * s, scaled.decode(scaled.encode(x * s)),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded.b_dec * s, scaled.b_dec, rtol=1e-4, atol=1e-5)  # the scale is in the weights
        assert not torch.allclose(folded.b_dec, scaled.b_dec)


@pytest.mark.parametrize("arch,inference", [("topk", "topk"), ("batchtopk", "jumprelu"), ("jumprelu", "jumprelu"),
                                            ("standard", "standard")])
def test_each_architecture_trains_saves_and_loads(zoo_store, tmp_path, arch, inference):
    from sae_lens import SAE

    cfg = SAETrainConfig(**{**SMALL, "arch": arch, "tokens": 256 * 12})
    rec = train_sae_from_store(zoo_store, "b", cfg, tmp_path / arch, progress=False)
    sae = SAE.load_from_disk(str(tmp_path / arch))
    assert sae.cfg.architecture() == inference and sae.cfg.d_sae == 256
    assert rec["metrics"]["fve"] is not None and 0 < rec["metrics"]["l0"] <= 256
    if inference == "jumprelu":
        assert "threshold" in load_file(str(tmp_path / arch / "sae_weights.safetensors"))


def _interrupting(stream_fn, after: int):
    def start(step):
        for i, b in enumerate(stream_fn(step), start=step):
            if i == after:
                raise KeyboardInterrupt  # a kill between checkpoints
            yield b
    return start


def test_killed_run_resumes_to_the_uninterrupted_weights(zoo_store, tmp_path):
    cfg = SAETrainConfig(**{**SMALL, "tokens": 256 * 30})
    kw = dict(hook_name="blocks.0.hook_resid_post", scale=zoo_store.scale("a"), progress=False)
    stream = store_batch_stream(zoo_store, "a", cfg.batch_size, cfg.seed)
    train_sae(stream, 128, cfg, tmp_path / "whole", **kw)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_sae(_interrupting(stream, 25), 128, cfg, out, **kw)
    assert not out.exists()  # no half-written SAE
    assert json.loads((partial_dir(out) / "latest.json").read_text())["steps"] == 20
    with pytest.raises(DiffkitError, match="--resume to continue it, or with --overwrite"):
        train_sae(stream, 128, cfg, out, **kw)
    with pytest.raises(DiffkitError, match="cannot resume .*lr differ"):
        train_sae(stream, 128, SAETrainConfig(**{**cfg.__dict__, "lr": 1e-3}), out, resume=True, **kw)
    latest = partial_dir(out) / "latest.json"
    good = latest.read_text()
    latest.write_text('{"dir": "step_99999999", "steps": 99}')  # names a checkpoint that is not there
    with pytest.raises(DiffkitError, match="names no usable checkpoint: pass --overwrite"):
        train_sae(stream, 128, cfg, out, resume=True, **kw)
    latest.write_text(good)
    logs = []
    train_sae(stream, 128, cfg, out, resume=True, log=logs.append, **kw)
    assert "step 20 of 30" in logs[0] and not partial_dir(out).exists()
    whole, cut = load_file(str(tmp_path / "whole" / "sae_weights.safetensors")), load_file(
        str(out / "sae_weights.safetensors"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    # an iterator (not a function of the start step) is advanced past the consumed batches instead
    with pytest.raises(KeyboardInterrupt):
        train_sae(_interrupting(stream, 15)(0), 128, cfg, tmp_path / "it", **kw)
    train_sae(stream(0), 128, cfg, tmp_path / "it", resume=True, **kw)
    it = load_file(str(tmp_path / "it" / "sae_weights.safetensors"))
    assert all(torch.equal(whole[k], it[k]) for k in whole)


def test_existing_output_is_kept_unless_overwritten(zoo_store, trained, tmp_path):
    root, recs = trained
    again = train_sae_from_store(zoo_store, "a", SAETrainConfig(**SMALL), root / "sae-a", resume=True, progress=False)
    saved = json.loads((root / "sae-a" / "sae_train.json").read_text())
    assert again == {**saved, **saved["metrics"]} and again["fve"] == recs["a"]["fve"]  # nothing retrained
    with pytest.raises(DiffkitError, match="other k: pass --overwrite"):
        train_sae_from_store(zoo_store, "a", SAETrainConfig(**{**SMALL, "k": 8}), root / "sae-a", progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(DiffkitError, match="not an SAE trained by diffkit"):
        train_sae_from_store(zoo_store, "a", SAETrainConfig(**SMALL), tmp_path / "junk", overwrite=True)


@pytest.mark.parametrize("args,message", [
    (["--k", "0"], "--k 0 is invalid"),
    (["--k", "300"], "--k 300 is invalid"),
    (["--tokens", "100"], "--tokens 100 is invalid"),
    (["--lr", "-1"], "--lr -1.0 is invalid"),
    (["--d-sae", "0"], "--d-sae 0 is invalid"),
    (["--threads", "-2"], "--threads must be 0 or more"),
])
def test_bad_options_are_one_line_errors(zoo_store, tmp_path, args, message):
    res = CliRunner().invoke(main, ["sae", "train", "--acts", str(zoo_store.root), "--source", "a", "--out",
                                    str(tmp_path / "s"), "--d-sae", "256", "--batch-size", "256", "--tokens", "2560",
                                    *args])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and (message is None or message in lines[0])
    assert not (tmp_path / "s").exists() and not partial_dir(tmp_path / "s").exists()


def test_missing_store_and_small_store(tmp_path, zoo_store):
    res = CliRunner().invoke(main, ["sae", "train", "--acts", str(tmp_path / "none"), "--source", "a", "--out",
                                    str(tmp_path / "s")])
    assert res.exit_code == 2 and "does not exist" in res.output
    with pytest.raises(DiffkitError, match="fewer than one batch"):
        train_sae_from_store(zoo_store, "a", SAETrainConfig(**{**SMALL, "batch_size": 10_000, "tokens": 10_000}),
                             tmp_path / "s", progress=False)
    assert not partial_dir(tmp_path / "s").exists()


def test_same_weights_as_the_zoo_trainer(tmp_path):
    """diffkit/zoo/build.py:train_sae is a thin call of train_sae; on the zoo's settings (raw activations, its
    batch sampler, its seed) it gives bit for bit the weights of the zoo's earlier direct call of sae-lens's
    SAETrainer.fit (written out here as the reference), so the committed zoo SAEs stay reproducible."""
    import math
    from dataclasses import replace

    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    from diffkit.models import load_model
    from diffkit.zoo.build import sequence_matrix, token_activations, train_sae as zoo_train_sae
    from diffkit.zoo.recipes import SAE_RECIPE

    model = load_model("zoo:base").model
    recipe = replace(SAE_RECIPE, corpus="prose", d_sae=128, steps=100, tokens=3000, batch_size=256)
    rec = zoo_train_sae(model, recipe, "base", tmp_path / "zoo")
    assert 0 < rec["fvu"] < 1 and rec["l0"] <= recipe.k
    ids, lengths = sequence_matrix(recipe.corpus, "train", model.cfg.n_ctx, seed=recipe.seed,
                                   limit=math.ceil(recipe.tokens / (model.cfg.n_ctx - 1)))
    acts = token_activations(model, recipe.hook, ids, lengths)
    gen = torch.Generator().manual_seed(recipe.seed)
    batches = (acts[torch.randint(0, len(acts), (recipe.batch_size,), generator=gen)] for _ in iter(int, 1))
    torch.manual_seed(recipe.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=recipe.d_sae, k=recipe.k))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=recipe.steps * recipe.batch_size, train_batch_size_samples=recipe.batch_size,
        lr=recipe.lr, lr_end=recipe.lr / 10, lr_scheduler_name="cosineannealing", lr_warm_up_steps=50,
        lr_decay_steps=recipe.steps // 5, n_restart_cycles=1, adam_beta1=0.9, adam_beta2=0.999, device="cpu",
        autocast=False, dead_feature_window=400, feature_sampling_window=400, n_checkpoints=0,
        checkpoint_path=None, save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=10)
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches).fit().save_inference_model(str(tmp_path / "ref"))
    zoo, ref = (load_file(str(tmp_path / d / "sae_weights.safetensors")) for d in ("zoo", "ref"))
    assert zoo.keys() == ref.keys() and all(torch.equal(zoo[k], ref[k]) for k in zoo)
