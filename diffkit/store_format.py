"""The on-disk format of an ActivationStore, and the checks that guard reading it.

Layout of a store directory::

    manifest.json                 what this is, how it was made, every shard with sizes + sha256
    tokens/shard_00000.ids.npy    int32 (n_seqs, ctx): the token sequences, BOS and padding included
    tokens/shard_00000.pos.npy    int64 (n_tokens,): flat position (row * ctx + pos) of each stored row
    a/shard_00000.npy             (n_tokens, d_a) activations of model A at its hook (raw, unscaled)
    b/shard_00000.npy             (n_tokens, d_b) activations of model B, same token positions
    labels/shard_00000.npy        optional uint8/int16 (n_tokens,): per-row answer key (0 ordinary, 1.. planted),
                                  present when manifest["labels"] is ({"names": [...]}: index = label value)

Within a shard the rows of training sequences come first, then those of held-out sequences
(``n_train`` in the manifest), so a split is a contiguous slice of every shard.

Files are written under a temporary name and renamed into place; the manifest is rewritten
(atomically) after each shard, so a killed run leaves a store that ``--resume`` completes. The
manifest is sealed (:func:`diffkit.io.seal`: a sha256 over its canonical JSON), so no byte of it
changes unnoticed; each shard file's size and sha256 are in it.

The generic artifact I/O (atomic writes, sha256, strict JSON / safetensors readers) lives in
:mod:`diffkit.io`, and diffkit imports it from there; it is re-exported here only for scripts that
imported it from this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiffkitError
from .io import (SEAL_KEY, atomic_save_npy, atomic_write_bytes, atomic_write_json, check_tensors,  # noqa: F401
                 first_line, load_safetensors, read_json, read_json_object, sha256_bytes, sha256_file,
                 verify_seal, verify_sha256, write_sealed_json)

STORE_KIND = "diffkit.ActivationStore"
FORMAT_VERSION = 2  # 2: the manifest is sealed (diffkit.io); version 1 had no checksum over the manifest itself
MANIFEST = "manifest.json"
SOURCES = ("a", "b")
INT_DTYPES = ("int32", "int64", "uint16", "uint32", "int16")
LABEL_DTYPES = ("uint8", "int16")


def shard_files(index: int, labels: bool = False) -> dict[str, str]:
    stem = f"shard_{index:05d}"
    names = {"ids": f"tokens/{stem}.ids.npy", "pos": f"tokens/{stem}.pos.npy",
             "a": f"a/{stem}.npy", "b": f"b/{stem}.npy"}
    return {**names, "labels": f"labels/{stem}.npy"} if labels else names


def validate_labels(manifest: dict) -> int:
    """The optional ``labels`` entry: a list of >= 1 distinct string names; returns how many. 0: no labels."""
    if "labels" not in manifest:
        return 0
    names = manifest["labels"]["names"] if isinstance(manifest["labels"], dict) else None
    if not isinstance(names, list) or not names or len(names) > 2**15 or len(set(map(str, names))) != len(names) \
            or not all(isinstance(n, str) for n in names):
        raise ValueError(f"labels.names = {repr(names)[:60]} (expected a list of distinct strings)")
    return len(names)


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` sealed (atomically); every writer of a manifest goes through here."""
    write_sealed_json(Path(root) / MANIFEST, manifest)


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.exists():
        raise DiffkitError(f"activation store {root} does not exist: run `diffkit collect --out {root}` first")
    if not path.exists():
        raise DiffkitError(f"{root} is not an activation store (no {MANIFEST}): point at a `diffkit collect` output")
    manifest = read_json(path, "the store is damaged, collect it again")
    if not isinstance(manifest, dict) or manifest.get("kind") != STORE_KIND:
        kind = repr(manifest.get("kind"))[:60] if isinstance(manifest, dict) else None
        raise DiffkitError(f"{path} is not an activation-store manifest (kind {kind}): point at a `diffkit collect` "
                           "output")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DiffkitError(f"{path} has store format version {repr(manifest.get('format_version'))[:40]}, this diffkit reads "
                           f"version {FORMAT_VERSION}: collect the store again with this version")
    manifest = verify_seal(path, manifest, "the manifest was edited or damaged: collect the store again")
    for key in ("config", "sources", "shards", "complete"):
        if key not in manifest:
            raise DiffkitError(f"{path} lacks the field {key!r}: the store is damaged, collect it again")
    return manifest


def _int(value: Any, what: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or value > 2**62:
        raise ValueError(f"{what} = {repr(value)[:40]} (expected an integer >= {lo})")
    return value


def validate_manifest(manifest: dict) -> None:
    """Structural checks of a complete store's manifest, so a damaged one fails at open with one line
    instead of a traceback (or wrong rows) at read time. Raises ValueError naming the bad field.

    Every shard lists exactly its four files with the shapes and dtypes its counts imply; counts are
    non-negative and add up to the totals; each stored scale equals the one its norm sums give.
    """
    import math

    cfg, sources, shards = manifest["config"], manifest["sources"], manifest["shards"]
    if not isinstance(cfg, dict) or not isinstance(sources, dict) or not isinstance(shards, list) or not shards:
        raise ValueError("config / sources / shards (expected objects and a non-empty list)")
    ctx, dtype = _int(cfg["ctx"], "config.ctx", 1), cfg["dtype"]
    d = {src: _int(sources[src]["d_model"], f"sources.{src}.d_model", 1) for src in SOURCES}
    for src in SOURCES:
        if not isinstance(sources[src]["hook"], str):
            raise ValueError(f"sources.{src}.hook = {repr(sources[src]['hook'])[:40]} (expected a string)")
    n_labels = validate_labels(manifest)
    seq_start, totals = 0, {"train": 0, "all": 0}
    for i, shard in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(shard, dict) or _int(shard["index"], f"{where}.index") != i:
            raise ValueError(f"{where}.index (expected {i}: shards out of order)")
        n_seqs, n_tok = _int(shard["n_seqs"], f"{where}.n_seqs", 1), _int(shard["n_tokens"], f"{where}.n_tokens")
        n_train = _int(shard["n_train"], f"{where}.n_train")
        if n_train > n_tok or n_tok > n_seqs * ctx or _int(shard["seq_start"], f"{where}.seq_start") != seq_start:
            raise ValueError(f"{where} counts (n_train {n_train}, n_tokens {n_tok}, n_seqs {n_seqs}, seq_start "
                             f"{shard['seq_start']}) do not add up")
        seq_start += n_seqs
        totals["train"] += n_train
        totals["all"] += n_tok
        expect = {"ids": ([n_seqs, ctx], "int"), "pos": ([n_tok], "int"), "a": ([n_tok, d["a"]], dtype),
                  "b": ([n_tok, d["b"]], dtype)}  # "int": any integer dtype (collect writes int32 / int64)
        if n_labels:
            expect["labels"] = ([n_tok], "label")
        names = shard_files(i, labels=bool(n_labels))
        if not isinstance(shard["files"], dict) or set(shard["files"]) != set(names.values()):
            raise ValueError(f"{where}.files (expected exactly {sorted(names.values())})")
        for key, (shape, dt) in expect.items():
            rec = shard["files"][names[key]]
            dt_ok = rec["dtype"] in {"int": INT_DTYPES, "label": LABEL_DTYPES}.get(dt, (dt,))
            if rec["shape"] != shape or not dt_ok or not isinstance(rec["sha256"], str):
                raise ValueError(f"{where}.files[{names[key]}] (shape {repr(rec['shape'])[:30]} dtype "
                                 f"{repr(rec['dtype'])[:20]}, expected {shape} {dt})")
            _int(rec["bytes"], f"{where}.files[{names[key]}].bytes", 1)
        for src in SOURCES:
            if not (isinstance(shard["norm_sum"][src], (int, float)) and math.isfinite(shard["norm_sum"][src])):
                raise ValueError(f"{where}.norm_sum.{src}")
    n = manifest["n_tokens"]
    if not isinstance(n, dict) or n.get("train") != totals["train"] or n.get("all") != totals["all"] or \
            n.get("heldout") != totals["all"] - totals["train"]:
        raise ValueError(f"n_tokens = {repr(n)[:80]} (the shards hold {totals})")
    rows = totals["train"] or totals["all"]
    for src in SOURCES:
        scale = manifest["scale"][src]
        mean_norm = sum(s["norm_sum"][src] for s in shards) / max(1, rows)
        want = math.sqrt(d[src]) / mean_norm if mean_norm > 0 else 1.0
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isclose(scale, want, rel_tol=1e-6):
            raise ValueError(f"scale.{src} = {repr(scale)[:30]} (its norm sums give {want:.6g})")


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
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises anything (TokenError on garbage)
        raise DiffkitError(f"shard file {path} cannot be read ({first_line(exc)}): collect the store again") from None
    if list(array.shape) != record["shape"] or str(array.dtype) != record["dtype"] or \
            (array.ndim > 1 and not array.flags.c_contiguous):
        raise DiffkitError(f"shard file {path} holds {array.dtype}{list(array.shape)}, the manifest says "
                           f"{record['dtype']}{record['shape']}: collect the store again")
    return array
