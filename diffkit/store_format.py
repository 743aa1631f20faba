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
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DiffkitError(f"{path} is not valid JSON ({reason}): {fix}") from None


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
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DiffkitError(f"{path} is not a readable safetensors file ({reason}): {fix}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_sha256(path: Path, expected: Any, fix: str) -> None:
    """Compare ``path``'s sha256 with the one its artifact's JSON recorded (``None``: written before checksums)."""
    if expected is None:
        return
    if not isinstance(expected, str) or sha256_file(path) != expected:
        raise DiffkitError(f"{path} fails its sha256 checksum: it is corrupted or was replaced; {fix}")


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
