"""The soak harness: its comparisons catch planted differences, and one real kill/resume cycle of the
crosscoder stage (the real CLI, a real SIGKILL) ends equal to the uninterrupted run."""

from __future__ import annotations

import json
import shutil

import pytest

from diffkit.bench.soak import (SoakConfig, compare_trees, killed_state_problem, leftovers, normalized_json,
                                rows_from, run_soak)


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    """References for collect + crosscoder and one kill/resume cycle of the crosscoder stage (~25 s)."""
    cfg = SoakConfig(cycles=1, seed=3, tokens=6000, shard_mb=0.25, dict_size=128, k=8, batch_size=512,
                     cc_tokens=20_000, checkpoint_every=4, kill_again=0.0, late_kill=1.0, stages=("crosscoder",))
    work = tmp_path_factory.mktemp("soak")
    return run_soak(cfg, work, log=lambda _: None), work


def test_one_real_cycle_is_killed_resumed_and_equal(soak):
    result, work = soak
    (cycle,) = result.cycles
    assert cycle.stage == "crosscoder" and cycle.attempts[-1].returncode == 0
    assert cycle.mismatches == [] and cycle.torn == [] and cycle.leftovers == [] and cycle.failures == []
    tally = result.tally()["crosscoder"]
    assert tally["runs"] == len(cycle.attempts) + 1
    assert tally["interruptions"] == sum(a.killed for a in cycle.attempts)
    if tally["interruptions"]:  # the kill landed after the run created its folder, before it ended: resumed
        assert cycle.attempts[1].resume
    rows = rows_from(result)
    assert {r.case.split(":")[0] for r in rows} == {"crosscoder"} and len(rows) == 3
    assert rows[1].figure == 0 and rows[1].baseline_figure == 0


def test_compare_trees_finds_a_flipped_byte_and_an_extra_file(soak, tmp_path):
    _, work = soak
    ref = work / "reference" / "crosscoder"
    got = tmp_path / "cc"
    shutil.copytree(ref, got)
    for path in got.rglob("*.json"):  # as if run in the other directory: its JSON names that one
        path.write_text(path.read_text().replace(str(ref), str(got)))
    assert compare_trees(ref, got) == []
    weights = got / "crosscoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (got / "stray.bin").write_bytes(b"x")
    assert compare_trees(ref, got) == ["extra stray.bin", "differs crosscoder.safetensors"]


def test_json_comparison_ignores_timing_and_the_run_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    from diffkit.io import write_sealed_json

    # sealed (diffkit.io): the seals differ with the timings and paths they cover, and are ignored with them
    write_sealed_json(a / "s.json", {"seconds": 1.0, "out": str(a / "x"), "loss": 2.0, "fit_seconds": 3})
    write_sealed_json(b / "s.json", {"seconds": 9.0, "out": str(b / "x"), "loss": 2.0, "fit_seconds": 7})
    assert normalized_json(a / "s.json", a) == normalized_json(b / "s.json", b) == {"out": "<OUT>/x", "loss": 2.0}
    (b / "s.json").write_text(json.dumps({"seconds": 9.0, "out": str(b / "x"), "loss": 2.5}))
    assert compare_trees(a, b) == ["differs s.json"]


def test_leftovers_are_temp_files_and_hidden_folders(tmp_path):
    (tmp_path / "checkpoints" / "step_0000004.partial").mkdir(parents=True)
    (tmp_path / "manifest.json.tmp").write_text("{}")
    (tmp_path / ".model.abc").mkdir()
    (tmp_path / "fine.json").write_text("{}")
    assert leftovers(tmp_path) == [".model.abc", "checkpoints/step_0000004.partial", "manifest.json.tmp"]


def test_a_killed_output_that_loads_but_differs_is_torn(soak, tmp_path):
    """A half-done output must not pass for an artifact: a loadable crosscoder with other weights is flagged,
    one that fails to load (no cfg.json yet) is the expected state."""
    import torch

    from baselines.crosscoder.model import load, save

    _, work = soak
    ref = work / "reference" / "crosscoder"
    torn = tmp_path / "torn"
    model = load(ref)
    with torch.no_grad():
        model.b_dec_D.add_(1.0)
    save(model, torn)
    assert "differs" in killed_state_problem("crosscoder", torn, ref)
    (torn / "cfg.json").unlink()
    assert killed_state_problem("crosscoder", torn, ref) is None
    assert killed_state_problem("crosscoder", tmp_path / "never-started", ref) is None
