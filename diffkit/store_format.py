"""The on-disk format of an ActivationStore, and the checks that guard reading it.

Layout of a store directory::

    manifest.json                 what this is, how it was made, every shard with sizes + sha256
    tokens/shard_00000.ids.npy    int32 (n_seqs, ctx): the token sequences, BOS and padding included
    tokens/shard_00000.pos.npy    int64 (n_tokens,): flat position (row * ctx + pos) of each stored row
    a/shard_00000.npy             (n_tokens, d_a) activations of model A at its hook (raw, unscaled)
    b/shard_00000.npy             (n_tokens, d_b) activations of model B, same token positions

Within a shard the rows of training sequences come first, then those of held-out sequences
(``n_train`` in the manifest), so a split is a contiguous slice of every shard.

Files are written under a temporary name and renamed into place; the manifest is rewritten
(atomically) after each shard, so a killed run leaves a store that ``--resume`` completes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiffkitError

STORE_KIND = "diffkit.ActivationStore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SOURCES = ("a", "b")


def shard_files(index: int) -> dict[str, str]:
    stem = f"shard_{index:05d}"
    return {"ids": f"tokens/{stem}.ids.npy", "pos": f"tokens/{stem}.pos.npy",
            "a": f"a/{stem}.npy", "b": f"b/{stem}.npy"}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> dict:
    """Save ``array`` as .npy under a temporary name, rename it into place; return its file record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path),
            "shape": list(array.shape), "dtype": str(array.dtype)}


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.exists():
        raise DiffkitError(f"activation store {root} does not exist: run `diffkit collect --out {root}` first")
    if not path.exists():
        raise DiffkitError(f"{root} is not an activation store (no {MANIFEST}): point at a `diffkit collect` output")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DiffkitError(f"{path} is not valid JSON ({exc}): the store is damaged, collect it again") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != STORE_KIND:
        raise DiffkitError(f"{path} is not an activation-store manifest (kind {manifest.get('kind') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DiffkitError(f"{path} has store format version {manifest.get('format_version')!r}, this diffkit reads "
                           f"version {FORMAT_VERSION}: collect the store again with this version")
    for key in ("config", "sources", "shards", "complete"):
        if key not in manifest:
            raise DiffkitError(f"{path} lacks the field {key!r}: the store is damaged, collect it again")
    return manifest


def check_shard_file(root: Path, rel: str, record: dict, verify: str) -> None:
    """Size (cheap, always) and optionally sha256 of one shard file against its manifest record."""
    path = root / rel
    if not path.exists():
        raise DiffkitError(f"shard file {path} is missing: the store is incomplete, run `diffkit collect --resume` "
                           "or collect it again")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise DiffkitError(f"shard file {path} is {size} bytes, the manifest says {record['bytes']}: it is "
                           "truncated or damaged, collect the store again")
    if verify == "full" and sha256_file(path) != record["sha256"]:
        raise DiffkitError(f"shard file {path} fails its sha256 checksum: it is corrupted, collect the store again")


def load_npy(root: Path, rel: str, record: dict) -> np.ndarray:
    """Memory-map one shard file and check that its header agrees with the manifest."""
    path = root / rel
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DiffkitError(f"shard file {path} cannot be read ({exc}): collect the store again") from None
    if list(array.shape) != record["shape"] or str(array.dtype) != record["dtype"]:
        raise DiffkitError(f"shard file {path} holds {array.dtype}{list(array.shape)}, the manifest says "
                           f"{record['dtype']}{record['shape']}: collect the store again")
    return array
