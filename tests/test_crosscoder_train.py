"""Crosscoder training: fresh batches, resume after SIGKILL, DDP = one process, bad input (real stores)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from baselines.crosscoder.train import TrainConfig, epoch_batches, read_checkpoint, train
from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.io import write_sealed_json

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _cfg(store, out, **kw) -> TrainConfig:
    opts = dict(acts=str(store.root), out=str(out), dict_size=128, k=4, batch_size=128, tokens=128 * 12, lr=2e-3,
                log_every=1, checkpoint_every=0, dead_after_tokens=1000, eval_tokens=256)
    opts.update(kw)
    return TrainConfig(**opts)


def _weights(out) -> dict:
    return load_file(str(Path(out) / "crosscoder.safetensors"))


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory):
    """A planted store with noise: every row is distinct, so rows can be identified by their values."""
    from diffkit.activations import ActivationStore
    from diffkit.synthetic import PlantedConfig, make_planted, write_planted_store

    out = tmp_path_factory.mktemp("planted") / "noisy"
    write_planted_store(make_planted(PlantedConfig(d_a=8, d_b=12, n_tokens=6000, noise=0.1)), out, seqs_per_shard=8)
    return ActivationStore.open(out)


def test_each_epoch_sees_every_row_at_most_once_and_no_empty_batch(noisy_store):
    small_store = noisy_store
    cfg = _cfg(small_store, "unused", batch_size=256)
    steps = small_store.n_tokens("train") // 256
    assert small_store.n_shards > 8  # more than one shuffle window
    for world in (1, 2):
        for epoch in (0, 1):
            seen = []
            for rank in range(world):
                batches = list(epoch_batches(small_store, cfg, epoch * steps, rank, world))
                assert len(batches) == steps and all(len(a) == 256 // world == len(b) for a, b in batches)
                seen += [row.tobytes() for a, b in batches for row in torch.cat([a, b], 1).numpy()]
            assert len(seen) == len(set(seen)) == steps * 256  # fresh rows, never repeated, ranks disjoint
    # a resumed run continues mid-epoch where the interrupted one stopped
    full = list(epoch_batches(small_store, cfg, 0))
    tail = list(epoch_batches(small_store, cfg, 3))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(full[3:], tail)) and len(tail) == steps - 3


def _complete_lines(path) -> list[dict]:
    """The metrics lines a reader can trust while the trainer may be appending: those ending in a newline
    (the last one can be half-written at the moment of the read, or of a SIGKILL)."""
    text = path.read_text()
    return [json.loads(s) for s in text[:text.rfind("\n") + 1].splitlines() if s.strip()]


def test_sigkill_loses_at_most_one_interval_and_resume_matches_uninterrupted(small_store, tmp_path):
    opts = dict(dict_size=2048, batch_size=256, tokens=256 * 300, checkpoint_every=10)
    killed = tmp_path / "killed"
    cmd = [PY, "-m", "diffkit.cli", "crosscoder", "train", "--acts", str(small_store.root), "--out", str(killed),
           "--dict-size", "2048", "--k", "4", "--batch-size", "256", "--tokens", str(256 * 300), "--lr", "2e-3",
           "--log-every", "1", "--checkpoint-every", "10", "--dead-after-tokens", "1000", "--threads", "1",
           "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    last = 0
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists():
            lines = _complete_lines(metrics)
            last = max([d["step"] for d in lines], default=0)
            if last >= 25:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = max(d["step"] for d in _complete_lines(metrics))
    step, _, _ = read_checkpoint(killed)
    assert done - step <= 10 and step >= 20, (done, step)  # at most one checkpoint interval lost
    assert not (killed / "crosscoder.safetensors").exists()
    train(_cfg(small_store, killed, **opts), resume=True, progress=False, log=lambda _: None)
    train(_cfg(small_store, tmp_path / "straight", **opts), progress=False)
    a, b = _weights(killed), _weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    steps = [json.loads(s)["step"] for s in metrics.read_text().splitlines() if '"train"' in s]
    assert steps == sorted(set(steps))  # the lines the killed run wrote after its checkpoint were dropped


def test_two_processes_under_torchrun_match_one_process(small_store, tmp_path):
    opts = ["--acts", str(small_store.root), "--dict-size", "256", "--k", "4", "--batch-size", "256", "--tokens",
            str(256 * 8), "--lr", "2e-3", "--dead-after-tokens", "512", "--checkpoint-every", "0", "--device", "cpu",
            "--quiet", "--threads", "1"]
    torchrun = Path(PY).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "diffkit.cli",
                          "crosscoder", "train", "--out", str(tmp_path / "ddp"), *opts], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = TrainConfig(acts=str(small_store.root), out=str(tmp_path / "one"), dict_size=256, k=4, batch_size=256,
                      tokens=256 * 8, lr=2e-3, dead_after_tokens=512, checkpoint_every=0)
    train(cfg, progress=False)
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-4, diff
    print(f"DDP (2 processes) vs 1 process, max |Δweight| after 8 steps: {diff:.2e}")


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_nan_in_a_batch_stops_naming_the_step_and_keeps_the_checkpoint(small_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(small_store.root, store)
    shard = np.load(store / "a" / "shard_00002.npy", mmap_mode="r+")
    shard[7, 3] = np.nan  # one bad value in one row; the file keeps its size
    shard.flush()
    del shard
    out = tmp_path / "cc"
    res = _run(["crosscoder", "train", "--acts", str(store), "--out", str(out), "--dict-size", "64", "--k", "4",
                "--batch-size", "64", "--checkpoint-every", "1", "--quiet", "--device", "cpu"])
    assert res.exit_code == 2
    msg = res.output.strip()
    assert msg.count("\n") == 0 and msg.startswith("error: non-finite activations (NaN/inf) of source a")
    step = int(msg.split("batch of step ")[1].split(":")[0])
    assert step > 0
    kept, _, _ = read_checkpoint(out)
    assert kept == step and f"the last good checkpoint (step {step}) is kept" in msg
    assert not (out / "crosscoder.safetensors").exists()


def test_bad_input_gets_one_line_errors(small_store, tmp_path):
    base = ["crosscoder", "train", "--acts", str(small_store.root), "--quiet", "--device", "cpu"]
    cases = [
        (["--out", str(tmp_path / "a"), "--dict-size", "0"], "--dict-size must be positive"),
        (["--out", str(tmp_path / "b"), "--dict-size", "16", "--k", "17"], "--k 17 must be between 1 and --dict-size 16"),
        (["--out", str(tmp_path / "c"), "--device", "cuda"], "no CUDA device"),
        (["--out", str(tmp_path / "d"), "--batch-size", "100000"], "fewer than one batch"),
    ]
    for extra, expected in cases:
        res = _run(base + extra)
        assert res.exit_code == 2 and expected in res.output and res.output.count("\n") == 1, res.output
    res = _run(["crosscoder", "train", "--acts", str(tmp_path), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "not an activation store" in res.output
    broken = tmp_path / "broken"
    shutil.copytree(small_store.root, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["sources"]["b"]["d_model"]  # a store whose second source has no width
    write_sealed_json(broken / "manifest.json", manifest)  # sealed, so the field check behind the seal fires
    res = _run(["crosscoder", "train", "--acts", str(broken), "--out", str(tmp_path / "f")])
    assert res.exit_code == 2 and "malformed" in res.output


def test_resume_with_another_config_is_refused_with_the_difference(small_store, tmp_path):
    out = tmp_path / "cc"
    args = ["crosscoder", "train", "--acts", str(small_store.root), "--out", str(out), "--dict-size", "64",
            "--k", "4", "--batch-size", "128", "--tokens", "512", "--quiet", "--device", "cpu"]
    assert _run(args).exit_code == 0
    res = _run(args + ["--lr", "0.01", "--resume"])
    assert res.exit_code == 2 and "lr: saved 0.0005 vs now 0.01" in res.output, res.output
    res = _run(args)
    assert res.exit_code == 2 and "pass --resume" in res.output
    with pytest.raises(DiffkitError, match="no train_config.json"):
        train(_cfg(small_store, tmp_path / "new"), resume=True, progress=False)


def _dead_fraction(out, store, n_batches: int = 8) -> float:
    """Latents that BatchTopK never picks on the first ``n_batches`` × 2048 train tokens."""
    from itertools import islice

    from baselines.crosscoder import load

    model = load(out)
    fired = torch.zeros(model.cfg.dict_size, dtype=torch.bool)
    with torch.no_grad():
        for xs in islice(store.iter_batches(2048, split="train", shuffle=False), n_batches):
            fired |= (model(torch.cat(xs, 1), train=True, sparse=False).f_BL > 0).any(0)
    return 1 - float(fired.float().mean())


def test_dead_latents_are_revived_on_the_planted_problem(tmp_path):
    """80 planted latents needed, 128 available, decoder init norm 0.1 (the default): the latents that die
    early must come back through the aux loss. They did not while each dead latent kept the Adam second
    moment of its live phase (aux steps ~100× below the lr): 55% stayed dead, FVE 0.67 / 0.70; with the
    moments reset when a latent turns dead, ~23% (FVE 0.78 / 0.79)."""
    from diffkit.activations import ActivationStore
    from diffkit.synthetic import PlantedConfig, make_planted, write_planted_store

    pair = make_planted(PlantedConfig(d_a=32, d_b=32, n_shared=48, n_a_only=16, n_b_only=16, k=3, n_tokens=32768))
    store = ActivationStore.open(write_planted_store(pair, tmp_path / "store"))
    opts = dict(acts=str(store.root), dict_size=128, k=3, batch_size=512, tokens=512 * 200, lr=3e-3, log_every=10,
                checkpoint_every=0, eval_tokens=4096)
    torch.set_num_threads(1)
    fixed = train(TrainConfig(out=str(tmp_path / "fixed"), **opts), progress=False, log=lambda _: None)
    old = train(TrainConfig(out=str(tmp_path / "old"), reset_dead_adam=False, **opts), progress=False,
                log=lambda _: None)
    dead_fixed, dead_old = _dead_fraction(tmp_path / "fixed", store), _dead_fraction(tmp_path / "old", store)
    assert json.loads((tmp_path / "fixed" / "train_config.json").read_text())["dead_after_tokens"] == 512 * 20  # tokens / 10
    assert dead_fixed < 0.4 < 0.45 < dead_old, (dead_fixed, dead_old)
    assert min(fixed["heldout"]["fve_a"], fixed["heldout"]["fve_b"]) > max(old["heldout"]["fve_a"],
                                                                          old["heldout"]["fve_b"])
