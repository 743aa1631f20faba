"""diffkit store import: a store from arrays computed elsewhere, identical to the one collect writes."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from diffkit.activations import ActivationStore
from diffkit.cli import main
from diffkit.store_format import shard_files, write_manifest

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory):
    from diffkit.activations import CollectConfig, collect_activations

    out = tmp_path_factory.mktemp("zoo") / "store"
    cfg = CollectConfig(model_a="zoo:base", model_b="zoo:finetuned", hook_a=HOOK, hook_b=HOOK, corpus="mixed",
                        tokens=6000, shard_mb=1.0)
    collect_activations(cfg, out, progress=False)
    return ActivationStore.open(out)


def _per_position(store, root):
    """The store's rows back as (n_seq, ctx, d) arrays; BOS and padding positions hold NaN (so an import
    that kept any of them fails), plus the (n_seq, ctx) ids and the per-sequence lengths."""
    ctx = store.config.ctx
    ids = np.concatenate([store._array(s, "ids") for s in range(store.n_shards)])
    n = len(ids)
    acts = {src: np.full((n, ctx, store.d_model(src)), np.nan, dtype=np.float32) for src in "ab"}
    lengths = np.zeros(n, dtype=np.int64)
    for s, shard in enumerate(store.manifest["shards"]):
        pos = store._array(s, "pos")
        seq, p = shard["seq_start"] + pos // ctx, pos % ctx
        for src in "ab":
            acts[src][seq, p] = store._array(s, src)
        np.maximum.at(lengths, seq, p + 1)
    paths = {}
    for name, arr in (("a", acts["a"]), ("b", acts["b"]), ("ids", ids), ("lengths", lengths)):
        paths[name] = root / f"{name}.npy"
        np.save(paths[name], arr)
    return paths


def _import(paths, out, *extra):
    return CliRunner().invoke(main, ["store", "import", "--a", str(paths["a"]), "--b", str(paths["b"]), "--ids",
                                     str(paths["ids"]), "--hook", HOOK, "--out", str(out), "--quiet", *extra])


def test_per_position_import_reproduces_the_collected_store(zoo_store, tmp_path):
    paths = _per_position(zoo_store, tmp_path)
    res = _import(paths, tmp_path / "imp", "--lengths", str(paths["lengths"]), "--bos", "--shard-mb", "1",
                  "--model-a", "zoo:base", "--model-b", "zoo:finetuned")
    assert res.exit_code == 0, res.output
    imp = ActivationStore.open(tmp_path / "imp", verify="full")
    assert imp.manifest["n_tokens"] == zoo_store.manifest["n_tokens"]
    assert imp.scale("a") == zoo_store.scale("a") and imp.scale("b") == zoo_store.scale("b")
    assert imp.n_shards == zoo_store.n_shards > 1
    for s in range(imp.n_shards):
        for key in ("ids", "pos", "a", "b"):
            rel = shard_files(s)[key]
            np.testing.assert_array_equal(np.load(imp.root / rel), np.load(zoo_store.root / rel), err_msg=rel)
    # and the diff on it is the diff on the collected store
    outs = []
    for store in (zoo_store, imp):
        res = CliRunner().invoke(main, ["align", "--sae-a", "zoo:base", "--sae-b", "zoo:finetuned", "--acts",
                                        str(store.root), "--out", str(tmp_path / f"al{len(outs)}"), "--quiet",
                                        "--device", "cpu"])
        assert res.exit_code == 0, res.output
        outs.append(json.loads((tmp_path / f"al{len(outs)}" / "summary.json").read_text()))
    for key in ("counts", "counts_at_thresholds", "map", "similarity_quantiles", "dead", "total_cost"):
        assert outs[0][key] == outs[1][key], key


def test_per_row_safetensors_import_fits_a_planted_map(tmp_path):
    rng = np.random.default_rng(0)
    n, d_a, d_b = 3000, 24, 40
    xa = rng.standard_normal((n, d_a)).astype(np.float32) * 3
    w, c = rng.standard_normal((d_a, d_b)).astype(np.float32), rng.standard_normal(d_b).astype(np.float32)
    xb = xa @ w + c  # B is exactly affine in A: the fitted map must explain all of it
    save_file({"acts": torch.from_numpy(xa), "other": torch.zeros(3)}, str(tmp_path / "a.safetensors"))
    np.save(tmp_path / "b.npy", xb)
    np.save(tmp_path / "ids.npy", rng.integers(0, 50_000, n))
    paths = {"a": f"{tmp_path / 'a.safetensors'}:acts", "b": tmp_path / "b.npy", "ids": tmp_path / "ids.npy"}
    res = _import(paths, tmp_path / "st", "--ctx", "50", "--hook-b", "blocks.3.hook_resid_post")
    assert res.exit_code == 0, res.output
    st = ActivationStore.open(tmp_path / "st")
    assert st.n_tokens("all") == n and st.n_tokens("heldout") == 300  # 60 sequences of 50, every 10th held out
    assert (st.hook("a"), st.hook("b"), st.d_model("a"), st.d_model("b")) == (HOOK, "blocks.3.hook_resid_post", 24, 40)
    norms = np.linalg.norm(xa.reshape(60, 50, d_a)[[i for i in range(60) if i % 10 != 9]].reshape(-1, d_a), axis=1)
    assert st.scale("a") == pytest.approx(np.sqrt(d_a) / norms.mean(), rel=1e-6)  # as collect computes it
    res = CliRunner().invoke(main, ["fit-map", "--acts", str(tmp_path / "st"), "--out", str(tmp_path / "map"), "--quiet"])
    assert res.exit_code == 0, res.output
    fit = json.loads((tmp_path / "map" / "map.json").read_text())
    assert fit["n_heldout"] == 300 and fit["scores"]["a_to_b"]["heldout_fve"] > 0.999
    from diffkit.sae_train import SAETrainConfig, train_sae_from_store  # and an SAE trains on it

    rec = train_sae_from_store(st, "b", SAETrainConfig(d_sae=64, k=8, tokens=256 * 12, batch_size=256),
                               tmp_path / "sae-b", progress=False)
    assert rec["hook_name"] == "blocks.3.hook_resid_post" and rec["metrics"]["eval_tokens"] == 300


def test_interrupted_import_resumes(zoo_store, tmp_path):
    paths = _per_position(zoo_store, tmp_path)
    opts = ("--lengths", str(paths["lengths"]), "--bos", "--shard-mb", "1")
    assert _import(paths, tmp_path / "full", *opts).exit_code == 0
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    man = json.loads((tmp_path / "cut" / "manifest.json").read_text())  # as a kill after the first shard leaves it
    man["shards"], man["complete"] = man["shards"][:1], False
    for key in ("n_tokens", "scale", "scale_formula"):
        man.pop(key)
    man.pop("json_sha256")
    write_manifest(tmp_path / "cut", man)  # sealed, as the importer itself writes it after each shard
    (tmp_path / "cut" / "a" / "shard_00001.npy").write_bytes(b"torn")
    res = _import(paths, tmp_path / "cut", *opts)
    assert res.exit_code == 2 and "--resume" in res.output
    res = _import(paths, tmp_path / "cut", *opts, "--resume")
    assert res.exit_code == 0, res.output
    full, cut = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("full", "cut"))
    assert full["shards"] == cut["shards"] and full["scale"] == cut["scale"]
    res = _import(paths, tmp_path / "cut", "--lengths", str(paths["lengths"]), "--bos", "--resume")
    assert res.exit_code == 2 and "cannot resume" in res.output  # other options (shard size) than the run it resumes


def _bad_inputs(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 8)).astype(np.float32)
    files = {"a": a, "b": rng.standard_normal((200, 12)).astype(np.float32), "ids": np.arange(200),
             "b_short": np.zeros((199, 12), np.float32), "ids_short": np.arange(150),
             "a_1d": np.zeros(200, np.float32), "a_int": np.zeros((200, 8), np.int64),
             "ids_float": np.zeros(200, np.float32), "a3": np.zeros((10, 20, 8), np.float32),
             "b3": np.zeros((10, 20, 12), np.float32), "ids3": np.zeros((10, 20), np.int64),
             "len_bad": np.full(10, 21), "ids_neg": np.full(200, -1)}
    nan = a.copy()
    nan[137, 3] = np.nan
    files["a_nan"] = nan
    for name, arr in files.items():
        np.save(tmp_path / f"{name}.npy", arr)
    save_file({"x": torch.zeros(200, 8), "y": torch.zeros(200, 8)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    return {name: tmp_path / f"{name}.npy" for name in [*files, "garbage"]} | {"two": tmp_path / "two.safetensors"}


@pytest.mark.parametrize("change,message", [
    ({"b": "b_short"}, "need the same rows"),
    ({"ids": "ids_short"}, "has shape (150,) but the activations have (200,) rows"),
    ({"a": "a_nan"}, "non-finite values (NaN/inf) at row 137"),
    ({"a": "a_1d", "b": "a_1d"}, "expected (n, d) rows or (n_seq, ctx, d)"),
    ({"a": "a_int"}, "must be floating point"),
    ({"ids": "ids_float"}, "token ids must be integers"),
    ({"ids": "ids_neg"}, "ids outside"),
    ({"a": "missing"}, "does not exist"),
    ({"a": "garbage"}, "not a readable .npy"),
    ({"a": "two"}, "holds 2 tensors (x, y): name one"),
    ({"a": "a3", "b": "b3", "ids": "ids3", "lengths": "len_bad"}, "--lengths has values outside 1..20"),
    ({"a": "a3", "b": "b", "ids": "ids3"}, "need the same rows"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, change, message):
    files = _bad_inputs(tmp_path)
    pick = {"a": "a", "b": "b", "ids": "ids", **change}
    paths = {k: files.get(v, tmp_path / f"{v}.npy") for k, v in pick.items() if k != "lengths"}
    extra = ["--lengths", str(files[pick["lengths"]])] if "lengths" in pick else []
    res = _import(paths, tmp_path / "out", *extra)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing half-written left behind
