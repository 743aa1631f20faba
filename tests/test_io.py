"""diffkit.io: the seal every artifact JSON carries, and the module boundary (models load without the store format)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from diffkit.errors import DiffkitError
from diffkit.io import SEAL_KEY, read_sealed_json, reseal_json, seal, verify_sha256, write_sealed_json

KIND, VERSION, FIX = "diffkit.Test", 3, "write it again"


def test_seal_round_trip_and_every_kind_of_damage(tmp_path):
    obj = {"kind": KIND, "format_version": VERSION, "scores": [0.2449566122777479, None, -1e-05], "n": 7,
           "nested": {"name": "blocks.0.hook_resid_post", "nan": float("nan")}}
    path = tmp_path / "a.json"
    write_sealed_json(path, obj)
    assert SEAL_KEY not in obj  # the caller's dict is not modified
    back = read_sealed_json(path, KIND, VERSION, FIX)
    assert json.dumps(back, sort_keys=True) == json.dumps(obj, sort_keys=True)
    text = path.read_text()

    def fails(new_text: str, match: str) -> None:
        path.write_text(new_text)
        with pytest.raises(DiffkitError, match=match) as err:
            read_sealed_json(path, KIND, VERSION, FIX)
        assert "\n" not in str(err.value) and str(path) in str(err.value) and FIX in str(err.value)

    fails(text.replace("0.2449566122777479", "0.244956612777479"), "fails its json_sha256")  # the digit of issue 13
    fails(text.replace('"n": 7', '"n": 7.0'), "fails its json_sha256")  # same number, other type
    fails(text.replace(f'"{SEAL_KEY}"', '"json_sha257"'), "has no json_sha256")  # the seal's name damaged
    stale = json.loads(text)
    del stale[SEAL_KEY]
    fails(json.dumps(stale), "has no json_sha256")  # deleted: never "written before checksums"
    stale["format_version"] = VERSION - 1
    fails(json.dumps(stale), "format version 2 \\(written before checksums were required\\)")
    fails(text.replace(KIND, "diffkit.Other"), "is not a diffkit.Test")
    # Whitespace and line endings are not data: a CRLF checkout (git autocrlf) or a reformatting loads the same.
    path.write_bytes(text.replace("\n", "\r\n").encode())
    assert read_sealed_json(path, KIND, VERSION, FIX)["n"] == 7
    path.write_text(json.dumps(json.loads(text), indent=None))
    assert read_sealed_json(path, KIND, VERSION, FIX)["n"] == 7
    # A deliberate edit is resealed explicitly (tests, migrations); a reader never does it.
    path.write_text(text.replace('"n": 7', '"n": 8'))
    reseal_json(path)
    assert read_sealed_json(path, KIND, VERSION, FIX)["n"] == 8
    assert seal(seal(obj)) == seal(obj)


def test_a_payload_checksum_is_required(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"abc")
    for missing in (None, [], 7):
        with pytest.raises(DiffkitError, match="no valid recorded sha256"):
            verify_sha256(tmp_path / "w.bin", missing, FIX)
    with pytest.raises(DiffkitError, match="fails its sha256"):
        verify_sha256(tmp_path / "w.bin", "0" * 64, FIX)


def test_committed_zoo_checkpoints_are_sealed_and_survive_crlf(tmp_path):
    from diffkit.models import load_checkpoint
    from diffkit.zoo import model_dir

    copy = tmp_path / "base"
    shutil.copytree(model_dir("base"), copy)
    meta = load_checkpoint(copy)[2]
    assert meta["format_version"] == 2 and len(meta["weights_sha256"]) == 64
    (copy / "model.json").write_bytes((copy / "model.json").read_bytes().replace(b"\n", b"\r\n"))
    load_checkpoint(copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one float16 weight: a valid file, caught only by the checksum
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DiffkitError, match="fails its sha256 checksum"):
        load_checkpoint(copy)


def test_loading_models_and_saes_does_not_import_the_store_format():
    code = ("import sys; from diffkit.models import load_model; from diffkit.saes import load_sae; "
            "load_model('zoo:base'); load_sae('zoo:base'); "
            "print(sorted(m for m in sys.modules if m in ('diffkit.store_format', 'diffkit.activations')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "[]", res.stderr[-2000:]


def test_store_format_keeps_the_old_names():
    import diffkit.io as io
    import diffkit.store_format as sf

    for name in ("atomic_write_bytes", "atomic_write_json", "atomic_save_npy", "sha256_file", "sha256_bytes",
                 "first_line", "read_json", "read_json_object", "load_safetensors", "verify_sha256", "check_tensors"):
        assert getattr(sf, name) is getattr(io, name)


def test_a_format_1_checkpoint_is_upgraded_only_if_it_passes_every_check(tmp_path):
    """The migration for checkpoints saved before the seal (the organisms' zoo models, say): it reseals a
    sound one and refuses, leaving the file as it was, one whose weights do not fit its config."""
    from diffkit.models import load_checkpoint, upgrade_checkpoint
    from diffkit.zoo import model_dir

    def as_format_1(dst):
        shutil.copytree(model_dir("base"), dst)
        meta = json.loads((dst / "model.json").read_text())
        for key in (SEAL_KEY, "weights_sha256"):
            del meta[key]
        (dst / "model.json").write_text(json.dumps({**meta, "format_version": 1}, indent=2, sort_keys=True))
        return dst

    good = as_format_1(tmp_path / "good")
    with pytest.raises(DiffkitError, match="written before checksums"):
        load_checkpoint(good)
    upgrade_checkpoint(good)
    assert load_checkpoint(good)[2]["format_version"] == 2
    bad = as_format_1(tmp_path / "bad")
    meta = json.loads((bad / "model.json").read_text())
    meta["config"]["d_model"] = 64
    (bad / "model.json").write_text(json.dumps(meta))
    before = (bad / "model.json").read_bytes()
    with pytest.raises(DiffkitError, match="does not match its config"):
        upgrade_checkpoint(bad)
    assert (bad / "model.json").read_bytes() == before
