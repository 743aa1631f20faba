"""Artifact I/O every stage shares: atomic writes, checksums, strict readers.

Nothing here knows what a store, a map or a model is; each artifact's module says which files it has
and what their JSON must hold. Loading a model, a map or a crosscoder imports this module only, not
the store format (:mod:`diffkit.store_format`).

**Sealed JSON.** An artifact's descriptor JSON (``map.json``, a FeatureDiff's ``config.json``, a store's
``manifest.json``, ``model.json``, a crosscoder's ``cfg.json``, a LatentTable's ``latents.json``) carries
``"json_sha256"``: the sha256 of the object's canonical text (``json.dumps(obj, sort_keys=True,
separators=(",", ":"))`` without that field). Payload files (tensors, tables, summaries) are covered by
their own sha256 recorded *inside* the sealed JSON, so one check on the JSON vouches for every byte of
the artifact. A flipped, deleted or inserted byte either breaks the JSON syntax or changes the object
and so its canonical text: one line naming the file and the fix. Why the canonical object rather than
the raw bytes: whitespace is not data, and a git checkout that converts line endings (``autocrlf``)
must not break the committed zoo artifacts.

A missing seal is an error, not "written before checksums": each sealed artifact's format version
was bumped when its seal became required, and readers accept only that version, so a deleted
``json_sha256`` (or a deleted payload checksum) can never pass as an old file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiffkitError

SEAL_KEY = "json_sha256"


# -- checksums ----------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_sha256(path: Path, expected: Any, fix: str) -> None:
    """``path``'s sha256 must equal the one its artifact's (sealed) JSON recorded; a missing one is an error."""
    if not isinstance(expected, str):
        raise DiffkitError(f"{path} has no valid recorded sha256 (got {repr(expected)[:40]}): the artifact is "
                           f"damaged or predates checksums; {fix}")
    if not Path(path).is_file():
        raise DiffkitError(f"{path} is missing: {fix}")
    if sha256_file(path) != expected:
        raise DiffkitError(f"{path} fails its sha256 checksum: it is corrupted or was replaced; {fix}")


# -- atomic writes ------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def json_bytes(obj: Any) -> bytes:
    """The bytes diffkit writes for a JSON file (indented, sorted keys, trailing newline)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_save_npy(path: Path, array: np.ndarray) -> dict:
    """Save ``array`` as .npy under a temporary name, rename it into place; return its file record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path),
            "shape": list(array.shape), "dtype": str(array.dtype)}


# -- sealed JSON --------------------------------------------------------------------------------
def canonical_sha256(obj: dict) -> str:
    """sha256 of ``obj``'s canonical JSON text, the seal field left out. Python's float repr round-trips,
    so parsing a file and re-serialising it gives the text that was hashed when it was written."""
    body = {k: v for k, v in obj.items() if k != SEAL_KEY}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())


def seal(obj: dict) -> dict:
    """A copy of ``obj`` with its seal (any old seal replaced)."""
    body = {k: v for k, v in obj.items() if k != SEAL_KEY}
    return {**body, SEAL_KEY: canonical_sha256(body)}


def write_sealed_json(path: Path, obj: dict) -> None:
    """Write ``obj`` sealed, atomically. ``obj`` itself is not modified."""
    atomic_write_json(path, seal(obj))


def verify_seal(path: Path, obj: dict, fix: str) -> dict:
    """``obj`` (parsed from ``path``) without its seal, after checking it; any mismatch is one line."""
    recorded = obj.get(SEAL_KEY)
    if recorded is None:
        raise DiffkitError(f"{path} has no {SEAL_KEY} checksum: it was edited or damaged (this format requires "
                           f"one); {fix}")
    if not isinstance(recorded, str) or recorded != canonical_sha256(obj):
        raise DiffkitError(f"{path} fails its {SEAL_KEY} checksum: its contents were edited or damaged; {fix}")
    return {k: v for k, v in obj.items() if k != SEAL_KEY}


def read_sealed_json(path: Path, kind: str, version: int, fix: str) -> dict:
    """A sealed artifact JSON of ``kind`` at format ``version``, seal checked and removed.

    Kind and version are checked first so that a file of an older format (no seal) says so.
    """
    obj = read_json_object(path, fix)
    if obj.get("kind") != kind:
        raise DiffkitError(f"{path} is not a {kind} (its kind is {repr(obj.get('kind'))[:60]}): {fix}")
    found = obj.get("format_version")
    if isinstance(found, bool) or found != version:
        older = isinstance(found, int) and not isinstance(found, bool) and found < version
        why = " (written before checksums were required)" if older else ""
        raise DiffkitError(f"{path} has format version {repr(found)[:20]}{why}, this diffkit reads version "
                           f"{version}: {fix}")
    return verify_seal(path, obj, fix)


def reseal_json(path: Path) -> None:
    """Recompute the seal of ``path`` after a deliberate edit (tests, format migrations): never on load."""
    atomic_write_json(path, seal(json.loads(Path(path).read_text())))


# -- strict readers -----------------------------------------------------------------------------
def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception as one short line for a DiffkitError message (its type when it has no text)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def read_json(path: Path, fix: str) -> Any:
    """Parse the JSON file ``path``; any failure is a one-line :class:`DiffkitError` ending in ``fix``."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DiffkitError(f"{path} is missing: {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise DiffkitError(f"{path} is not valid JSON ({first_line(exc, 120)}): {fix}") from None


def read_json_object(path: Path, fix: str) -> dict:
    """:func:`read_json` for files that must hold a JSON object."""
    obj = read_json(path, fix)
    if not isinstance(obj, dict):
        raise DiffkitError(f"{path} holds a JSON {type(obj).__name__}, not an object: {fix}")
    return obj


def load_safetensors(path: Path, fix: str, device: str = "cpu") -> dict:
    """All tensors of the safetensors file ``path`` (torch); a missing, truncated or garbled file is a
    one-line :class:`DiffkitError` ending in ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise DiffkitError(f"{path} is missing: {fix}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise DiffkitError(f"{path} is not a readable safetensors file ({first_line(exc, 120)}): {fix}") from None


def check_tensors(tensors: dict, expected: dict[str, tuple], what: str, fix: str, exact: bool = True) -> None:
    """Every name of ``expected`` present with its shape and a floating dtype; with ``exact`` no other name.

    Lists missing, unexpected and mis-shaped tensors in one line (strict loading, safetensors-style).
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected)) if exact else []
    shapes = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(expected[k])})" for k in expected
              if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
    dtypes = [f"{k} {tensors[k].dtype}" for k in expected if k in tensors and not tensors[k].is_floating_point()]
    if missing or unexpected or shapes or dtypes:
        parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                 f"wrong shape {shapes}" if shapes else "", f"not floating point {dtypes}" if dtypes else ""]
        raise DiffkitError(f"{what} does not fit its config: {'; '.join(p for p in parts if p)}: {fix}")
