"""An unreachable Hugging Face hub is one line naming the model or SAE and the fix, exit 2.

The hub is made unreachable the way a user would (``HF_HUB_OFFLINE=1``) with an empty cache
(``HF_HOME`` in a temporary directory), so the real hub-loading code runs and fails: TransformerLens /
transformers raise OSError, sae-lens / huggingface_hub LocalEntryNotFoundError.
"""

from __future__ import annotations

import os
import subprocess
import sys

from diffkit.errors import hub_error


def _offline_cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "diffkit.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def _one_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_collect_with_a_hub_model_offline(tmp_path):
    line = _one_line(_offline_cli(["collect", "--model-a", "gpt2", "--model-b", "gpt2", "--hook",
                                   "blocks.0.hook_resid_post", "--tokens", "1000", "--out", str(tmp_path / "store"),
                                   "--quiet"], tmp_path))
    assert "model 'gpt2'" in line and "hub could not be reached" in line, line
    assert "HF_HUB_OFFLINE is set" in line and "local directory" in line, line
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_align_with_a_registry_sae_offline(small_store, tmp_path):
    spec = "gpt2-small-res-jb/blocks.5.hook_resid_pre"
    line = _one_line(_offline_cli(["align", "--sae-a", spec, "--sae-b", spec, "--acts", str(small_store.root), "--out",
                                   str(tmp_path / "diff"), "--quiet"], tmp_path))
    assert f"SAE {spec!r}" in line and "hub could not be reached" in line, line
    assert "HF_HUB_OFFLINE is set" in line and "local directory" in line, line


def test_the_message_tells_unreachable_from_refused(monkeypatch):
    """Online, a connection failure says to connect once and cache; a hub that answered (a wrong name,
    no access) is not called unreachable."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    except OSError as exc:
        msg = str(hub_error("model 'gpt2'", exc))
    assert "could not be reached" in msg and "HF_HUB_OFFLINE=1 then reads the cache" in msg and "\n" not in msg
    try:
        try:
            raise ConnectionError("[Errno 101] Network is unreachable")
        except ConnectionError as inner:
            raise OSError("cannot fetch cfg.json") from inner
    except OSError as exc:
        assert "could not be reached" in str(hub_error("SAE 'x/y'", exc))  # found in the cause
    msg = str(hub_error("model 'nobody/nothing'", OSError("nobody/nothing is not a valid model identifier\nmore")))
    assert "could not be reached" not in msg and "check the name" in msg and "\n" not in msg
