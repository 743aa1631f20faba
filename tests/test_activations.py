"""The activation store: contents checked against a direct forward pass, splits, iteration,
resume after a real SIGKILL, and every bad input the foundation issue names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_checkpoint, small_config
from diffkit.activations import ActivationStore, collect_activations, is_heldout
from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.models import load_model
from diffkit.io import write_sealed_json
from diffkit.store_format import MANIFEST, shard_files


def test_rows_equal_a_direct_forward_pass(small_store, tiny_models):
    """Every stored row is the model's activation at that token position (full forward, no stop)."""
    model_a = load_model(tiny_models["a"]).model
    model_b = load_model(tiny_models["b"]).model
    shard = 1
    ids = np.asarray(small_store._array(shard, "ids")).astype(np.int64)
    pos = np.asarray(small_store._array(shard, "pos"))
    pos = pos.copy()
    _, cache_a = model_a.run_with_cache(torch.from_numpy(ids))
    _, cache_b = model_b.run_with_cache(torch.from_numpy(ids))
    ref_a = cache_a["blocks.0.hook_resid_post"].reshape(-1, 32)[pos]
    ref_b = cache_b["blocks.1.hook_resid_post"].reshape(-1, 48)[pos]
    torch.testing.assert_close(torch.from_numpy(np.array(small_store._array(shard, "a"))), ref_a,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.array(small_store._array(shard, "b"))), ref_b,
                               rtol=1e-4, atol=1e-5)


def test_no_bos_or_padding_positions_are_stored(small_store):
    bos, pad = 256, 257
    for s in range(small_store.n_shards):
        ids = np.asarray(small_store._array(s, "ids"))
        pos = np.asarray(small_store._array(s, "pos"))
        tokens = ids.reshape(-1)[pos]
        assert not np.isin(tokens, [bos, pad]).any()
        assert (pos % ids.shape[1] != 0).all()


def test_token_count_split_and_scale(small_store):
    m = small_store.manifest
    assert small_store.n_tokens("all") == 4000 == m["n_tokens"]["train"] + m["n_tokens"]["heldout"]
    assert 0.05 < small_store.n_tokens("heldout") / 4000 < 0.2
    # Held-out rows belong to held-out sequences only (split by sequence, every 10th).
    for shard in m["shards"]:
        pos = np.asarray(small_store._array(shard["index"], "pos"))
        seq = shard["seq_start"] + pos // small_store.config.ctx
        held = np.array([is_heldout(int(s), 10) for s in seq])
        assert not held[:shard["n_train"]].any() and held[shard["n_train"]:].all()
    # Normalized train rows have mean norm sqrt(d_model); raw ones do not (scale applied on read).
    for src, d in (("a", 32), ("b", 48)):
        norms = torch.cat([x.norm(dim=1) for x in
                           (pair[0 if src == "a" else 1] for pair in small_store.iter_shards("train"))])
        assert abs(float(norms.mean()) - d ** 0.5) < 1e-3 * d ** 0.5
    raw_a, _ = small_store.batch(np.arange(100), normalized=False)
    norm_a, _ = small_store.batch(np.arange(100))
    torch.testing.assert_close(norm_a, raw_a * small_store.scale("a"))


def test_shuffled_iterator_covers_each_row_once(small_store):
    from collections import Counter

    n = small_store.n_tokens("train")
    all_a, _ = small_store.batch(np.arange(n), normalized=False)
    expected = Counter(tuple(r.tolist()) for r in all_a)  # rows as values: equal contexts give equal rows
    index = {tuple(r.tolist()): i for i, r in enumerate(all_a)}
    seen, rows_seen = Counter(), []
    for a, b in small_store.iter_batches(128, seed=3, drop_last=False, normalized=False, window=2):
        assert 0 < len(a) <= 128 and len(a) == len(b)
        seen.update(tuple(r.tolist()) for r in a)
        rows_seen.extend(index[tuple(r.tolist())] for r in a)
    assert seen == expected                              # every row once: no repeats, none lost
    assert rows_seen[:200] != sorted(rows_seen[:200])    # shuffled
    full = [len(a) for a, _ in small_store.iter_batches(128)]
    assert set(full) == {128} and len(full) == n // 128  # drop_last: only full batches


def test_iterator_is_seeded_and_ranks_partition(small_store):
    def first_rows(**kw):
        return [a[:, 0].clone() for a, _ in small_store.iter_batches(64, normalized=False, **kw)]

    e0, e0_again, e1 = first_rows(epoch=0), first_rows(epoch=0), first_rows(epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(e0, e0_again))
    assert not all(torch.equal(x, y) for x, y in zip(e0, e1))
    r0, r1 = first_rows(rank=0, world_size=2), first_rows(rank=1, world_size=2)
    assert [torch.equal(x, y) for x, y in zip(r0, e0[0::2])] == [True] * len(r0)
    assert [torch.equal(x, y) for x, y in zip(r1, e0[1::2])] == [True] * len(r1)


def test_token_contexts_point_at_the_row(small_store):
    ctx = small_store.contexts([0, 7], window=4)
    for (ids, offset), idx in zip(ctx, [0, 7]):
        shard, row = small_store._locate("train", np.array([idx]))
        flat = int(small_store._array(int(shard[0]), "pos")[row[0]])
        all_ids = np.asarray(small_store._array(int(shard[0]), "ids")).reshape(-1)
        assert ids[offset] == all_ids[flat]


def checksums(root: Path) -> dict:
    manifest = json.loads((root / MANIFEST).read_text())
    return {rel: rec["sha256"] for s in manifest["shards"] for rel, rec in s["files"].items()}


def test_resume_after_failure_is_identical(tiny_models, tmp_path, monkeypatch):
    cfg = small_config(tiny_models, tokens=3000)
    collect_activations(cfg, tmp_path / "ref", progress=False)
    import diffkit.activations as act

    calls = {"n": 0}
    real = act.atomic_save_npy

    def dying_save(path, array):
        calls["n"] += 1
        if calls["n"] == 9:  # the first file of the third shard
            raise KeyboardInterrupt
        return real(path, array)

    monkeypatch.setattr(act, "atomic_save_npy", dying_save)
    with pytest.raises(KeyboardInterrupt):
        collect_activations(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(act, "atomic_save_npy", real)
    with pytest.raises(DiffkitError, match="incomplete"):
        ActivationStore.open(tmp_path / "run")
    summary = collect_activations(cfg, tmp_path / "run", resume=True, progress=False)
    assert summary.resumed_shards == 2
    assert checksums(tmp_path / "run") == checksums(tmp_path / "ref")
    ActivationStore.open(tmp_path / "run", verify="full")


def test_resume_after_sigkill_is_identical(tiny_models, tmp_path):
    """A real `diffkit collect` process killed with SIGKILL mid-run, then resumed."""
    args = ["--model-a", tiny_models["a"], "--model-b", tiny_models["b"], "--hook", "blocks.0.hook_resid_post",
            "--hook-b", "blocks.1.hook_resid_post", "--tokens", "12000", "--ctx", "64", "--shard-mb", "0.05",
            "--batch-size", "4", "--quiet"]
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffkit.cli", "collect", *args, "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        manifest = run / MANIFEST
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"collect ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(json.loads((run / MANIFEST).read_text())["shards"])
    result = CliRunner().invoke(main, ["collect", *args, "--out", str(run), "--resume"])
    assert result.exit_code == 0, result.output
    assert f"{kept} shards kept" in result.output
    result = CliRunner().invoke(main, ["collect", *args, "--out", str(tmp_path / "ref")])
    assert result.exit_code == 0, result.output
    assert checksums(run) == checksums(tmp_path / "ref")


def cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in result.output
    return message


def collect_args(models, out, **over):
    opts = {"--model-a": models["a"], "--model-b": models["b"], "--hook": "blocks.0.hook_resid_post",
            "--tokens": "500", "--ctx": "64", "--out": str(out)}
    opts.update(over)
    return ["collect", "--quiet", *[x for kv in opts.items() for x in kv if x is not None]]


def test_bad_inputs_to_collect(tiny_models, tmp_path):
    msg = cli_error(collect_args(tiny_models, tmp_path / "x1", **{"--hook": "blocks.0.hook_resid_psot"}))
    assert "unknown hook" in msg and "hook_resid_post with N in 0..1" in msg
    assert "unknown model spec" in cli_error(collect_args(tiny_models, tmp_path / "x2", **{"--model-b": "nonesuch-7b"}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert "has no text" in cli_error(collect_args(tiny_models, tmp_path / "x3", **{"--corpus": str(tmp_path / "empty")}))
    (tmp_path / "small.txt").write_text("just a few words of text")
    msg = cli_error(collect_args(tiny_models, tmp_path / "x4", **{"--corpus": str(tmp_path / "small.txt")}))
    assert "fewer than --tokens" in msg
    msg = cli_error(collect_args(tiny_models, tmp_path / "x5", **{"--model-b": tiny_models["nan"]}))
    assert "non-finite" in msg and "sequence" in msg
    assert "--ctx 64" in cli_error(collect_args(tiny_models, tmp_path / "x6", **{"--ctx": "128"}))
    assert "no CUDA" in cli_error(collect_args(tiny_models, tmp_path / "x7", **{"--device": "cuda"})) \
        or torch.cuda.is_available()


def test_existing_output_and_resume_rules(tiny_models, tmp_path):
    out = tmp_path / "store"
    assert CliRunner().invoke(main, collect_args(tiny_models, out)).exit_code == 0
    assert "--resume" in cli_error(collect_args(tiny_models, out))
    msg = cli_error(collect_args(tiny_models, out, **{"--tokens": "600"}) + ["--resume"])
    assert "tokens: stored 500 vs now 600" in msg
    assert CliRunner().invoke(main, collect_args(tiny_models, out, **{"--tokens": "600"}) + ["--overwrite"]).exit_code == 0
    assert ActivationStore.open(out).n_tokens("all") == 600
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert "refusing to delete" in cli_error(collect_args(tiny_models, tmp_path / "mine") + ["--overwrite"])
    assert (tmp_path / "mine" / "thesis.tex").exists()
    # --overwrite with a bad option fails before the old store is touched.
    cli_error(collect_args(tiny_models, out, **{"--hook": "nonsense"}) + ["--overwrite"])
    assert ActivationStore.open(out).n_tokens("all") == 600


@pytest.fixture()
def store_copy(small_store, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(small_store.root, dst)
    return dst


def test_truncated_shard_is_detected_on_open(store_copy):
    path = store_copy / shard_files(1)["a"]
    path.write_bytes(path.read_bytes()[:-100])
    msg = cli_error(["store", "info", str(store_copy)])
    assert "truncated" in msg and "shard_00001" in msg


def test_corrupted_shard_is_detected_by_verify(store_copy):
    path = store_copy / shard_files(0)["b"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    ActivationStore.open(store_copy)  # same size: the cheap check passes...
    assert "checksum" in cli_error(["store", "verify", str(store_copy)])  # ...the full one does not


def test_missing_shard_and_bad_manifests(store_copy, tmp_path):
    (store_copy / shard_files(2)["ids"]).unlink()
    assert "missing" in cli_error(["store", "info", str(store_copy)])
    manifest = json.loads((store_copy / MANIFEST).read_text())
    (store_copy / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    assert "format version 99" in cli_error(["store", "info", str(store_copy)])
    broken = {k: v for k, v in manifest.items() if k != "scale"}
    (store_copy / MANIFEST).write_text(json.dumps(broken))  # an edit that leaves the seal stale
    assert "fails its json_sha256 checksum" in cli_error(["store", "info", str(store_copy)])
    write_sealed_json(store_copy / MANIFEST, broken)  # sealed but wrong: the field checks behind the seal fire
    with pytest.raises(DiffkitError, match="malformed .*scale"):
        ActivationStore.open(store_copy, verify="none")
    (store_copy / MANIFEST).write_text("{ not json")
    assert "not valid JSON" in cli_error(["store", "info", str(store_copy)])
    assert "does not exist" in cli_error(["store", "info", str(tmp_path / "nowhere")])


def test_shard_with_wrong_shape_is_rejected(store_copy):
    rel = shard_files(0)["a"]
    manifest = json.loads((store_copy / MANIFEST).read_text())
    record = manifest["shards"][0]["files"][rel]
    np.save(store_copy / rel, np.zeros((record["shape"][0], 7), np.float32))
    record["bytes"] = (store_copy / rel).stat().st_size
    write_sealed_json(store_copy / MANIFEST, manifest)
    st = ActivationStore.open(store_copy)
    with pytest.raises(DiffkitError, match="manifest says"):
        st.batch([0])


def test_config_validation():
    from diffkit.activations import CollectConfig

    base = dict(model_a="a", model_b="b", hook_a="h", hook_b="h", corpus="prose", tokens=10)
    for bad, match in (({"tokens": 0}, "--tokens"), ({"dtype": "int8"}, "--dtype"),
                       ({"heldout_every": 1}, "--heldout-every"), ({"batch_size": 0}, "--batch-size"),
                       ({"max_norm_ratio": 1.0}, "--max-norm-ratio"), ({"max_norm_ratio": -2}, "--max-norm-ratio")):
        with pytest.raises(DiffkitError, match=match):
            CollectConfig(**{**base, **bad})


def test_open_memory_maps_are_bounded(small_store, monkeypatch):
    import diffkit.activations as act

    expected = [a.clone() for a, _ in small_store.iter_batches(100, seed=1)]
    fresh = ActivationStore.open(small_store.root)
    monkeypatch.setattr(act, "MAX_OPEN_MAPS", 3)
    got = [a for a, _ in fresh.iter_batches(100, seed=1)]
    assert len(fresh._arrays) <= 3
    assert all(torch.equal(x, y) for x, y in zip(expected, got)) and len(got) == len(expected)


def test_resume_refuses_changed_model_weights(tiny_models, tmp_path):
    import shutil

    from conftest import make_checkpoint

    model_b = tmp_path / "model_b"
    shutil.copytree(tiny_models["b"], model_b)
    cfg = small_config(tiny_models, model_b=str(model_b), tokens=2000)
    manifest_path = tmp_path / "run" / MANIFEST
    collect_activations(cfg, tmp_path / "run", progress=False)
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False  # as if killed after one shard
    write_sealed_json(manifest_path, manifest)
    make_checkpoint(model_b, d_model=48, seed=7)  # same path, other weights
    with pytest.raises(DiffkitError, match="model B weights_sha256 differ"):
        collect_activations(cfg, tmp_path / "run", resume=True, progress=False)


def _rows_and_tokens(store: ActivationStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rows of a store in shard order (a, b) and the token id each row belongs to."""
    a, b, tok = [], [], []
    for s in range(store.n_shards):
        ids, pos = np.asarray(store._array(s, "ids")), np.asarray(store._array(s, "pos"))
        a.append(np.asarray(store._array(s, "a")))
        b.append(np.asarray(store._array(s, "b")))
        tok.append(ids.reshape(-1)[pos])
    return np.concatenate(a), np.concatenate(b), np.concatenate(tok)


def test_massive_activation_tokens_are_left_out(tiny_models, tmp_path):
    """A planted massive activation (one token's embedding x1000 in model B) is dropped by
    --max-norm-ratio, and nothing else: the kept rows are exactly the unfiltered store's other rows."""
    massive = ord("e")
    models = {**tiny_models, "b": str(make_checkpoint(tmp_path / "massive", d_model=48, seed=1,
                                                      massive_byte=massive))}
    collect_activations(small_config(models), tmp_path / "plain", progress=False)
    summary = collect_activations(small_config(models, max_norm_ratio=20), tmp_path / "filtered", progress=False)
    plain, filtered = ActivationStore.open(tmp_path / "plain"), ActivationStore.open(tmp_path / "filtered")
    pa, pb, ptok = _rows_and_tokens(plain)
    fa, fb, ftok = _rows_and_tokens(filtered)
    keep = ptok != massive
    assert 0 < (~keep).sum() < len(keep) // 4
    assert summary.massive_dropped == int((~keep).sum())
    assert not (ftok == massive).any()
    np.testing.assert_array_equal(fa, pa[keep])
    np.testing.assert_array_equal(fb, pb[keep])
    assert filtered.n_tokens("all") == plain.n_tokens("all") - summary.massive_dropped
    assert filtered.scale("b") > 5 * plain.scale("b")  # the planted norms no longer set the scale (9x here)
    # On models without massive activations the same ratio leaves every token in.
    clean = collect_activations(small_config(tiny_models, max_norm_ratio=20), tmp_path / "clean", progress=False)
    assert clean.massive_dropped == 0 and clean.tokens == plain.n_tokens("all")
