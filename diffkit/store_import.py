"""Build an ActivationStore from activations computed elsewhere (nnsight, another cache, a cluster job).

Two layouts, as ``.npy`` (memory-mapped) or ``.safetensors`` (``FILE.safetensors`` with one tensor, or
``FILE.safetensors:NAME``):

- **per position**: ``A`` (n_seq, ctx, d_a), ``B`` (n_seq, ctx, d_b), ``IDS`` (n_seq, ctx) token ids.
  Rows kept: positions ``[1 if bos else 0, length)`` of each sequence (``lengths`` (n_seq,) real
  tokens per row, default all ``ctx``), so BOS and padding are left out as ``collect`` does.
- **per row**: ``A`` (n, d_a), ``B`` (n, d_b), ``IDS`` (n,): one token stream, BOS and padding already
  removed; cut into sequences of ``ctx`` consecutive rows (the last one shorter) for the split and
  for the contexts that reports show.

Checked before anything is written: same number of rows on both sides and in the ids, 2-D / 3-D
shapes, floating activations, integer non-negative ids, lengths in 1..ctx. Finiteness is checked
shard by shard as the data streams through (a large array is never loaded whole); a non-finite
value names its file, sequence and position, and the half-built store is removed.

The store is written with the collector's own writers (:func:`diffkit.activations.finish_manifest`,
``atomic_save_npy``, ``shard_files``, the manifest rewritten after each shard), so it is the same
format, split (every ``heldout_every``-th sequence held out, training rows first in a shard) and
normalization scale ``sqrt(d) / mean ||x||`` over train rows; a killed import is finished with
``resume``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DiffkitError
from .io import first_line

FLOAT_KINDS = "f"


class _Array:
    """A read-only array on disk, read in row ranges (``.npy`` memory map or a safetensors slice)."""

    def __init__(self, spec: str, what: str):
        self.spec, self.what = spec, what
        path, _, name = spec.partition(".safetensors:")
        path = Path(path + ".safetensors") if name else Path(spec)
        if not path.is_file():
            raise DiffkitError(f"{what} file {path} does not exist: check the path")
        self.path = path
        self._st = None
        if path.suffix == ".npy":
            try:
                self._np = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many types
                raise DiffkitError(f"{what} file {path} is not a readable .npy array ({first_line(exc)}): save it "
                                   "with numpy.save") from None
            self.shape, self.kind, self.dtype = tuple(self._np.shape), self._np.dtype.kind, str(self._np.dtype)
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
                raise DiffkitError(f"{what} file {path} is not a readable safetensors file ({first_line(exc)}): "
                                   "check the file") from None
            if not name:
                if len(keys) != 1:
                    raise DiffkitError(f"{what} file {path} holds {len(keys)} tensors ({', '.join(keys[:6])}): name "
                                       f"one as {path}:NAME")
                name = keys[0]
            if name not in keys:
                raise DiffkitError(f"{what} file {path} has no tensor {name!r} (it has {', '.join(keys[:6])})")
            self._st = handle.get_slice(name)
            self.shape = tuple(self._st.get_shape())
            self.dtype = self._st.get_dtype().lower()  # "F32", "BF16", "I64" ...
            self.kind = "f" if self.dtype.startswith(("f", "bf")) else "i" if self.dtype.startswith(("i", "u")) else "?"
        else:
            raise DiffkitError(f"{what} file {path} is neither .npy nor .safetensors: save the array in one of them")

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` along the first axis, as a numpy array (float32 for floating data)."""
        if self._st is None:
            block = np.asarray(self._np[lo:hi])
        else:
            import torch

            block = self._st[lo:hi]
            block = (block.float() if block.is_floating_point() else block.to(torch.int64)).numpy()
        return block.astype(np.float32, copy=False) if block.dtype.kind == "f" else block

    def read_all(self) -> np.ndarray:
        return self.read(0, self.shape[0])


@dataclass(frozen=True)
class ImportConfig:
    """What an import reads and how it cuts it (saved in the store's manifest as ``import``)."""

    a: str
    b: str
    ids: str
    hook_a: str
    hook_b: str
    model_a: str = ""
    model_b: str = ""
    lengths: str | None = None
    bos: bool = False
    ctx: int = 128  # per-row layout only: rows per sequence
    heldout_every: int = 10
    dtype: str = "float32"
    shard_mb: float = 32.0


def _check_inputs(cfg: ImportConfig) -> tuple[dict[str, _Array], np.ndarray, np.ndarray, int]:
    """Open and check everything cheap to check; return (arrays, ids (n_seq, ctx), lengths, ctx)."""
    arrays = {"a": _Array(cfg.a, "--a"), "b": _Array(cfg.b, "--b")}
    ids_arr = _Array(cfg.ids, "--ids")
    for src, arr in arrays.items():
        if arr.kind not in FLOAT_KINDS:
            raise DiffkitError(f"--{src} {arr.path} has dtype {arr.dtype}: activations must be floating point")
        if len(arr.shape) not in (2, 3):
            raise DiffkitError(f"--{src} {arr.path} has shape {arr.shape}: expected (n, d) rows or (n_seq, ctx, d) "
                               "per position")
    sa, sb = arrays["a"].shape, arrays["b"].shape
    if len(sa) != len(sb) or sa[:-1] != sb[:-1]:
        raise DiffkitError(f"--a has shape {sa} but --b {sb}: both need the same rows (same tokens in the same "
                           "order); only the last dimension (d_model) may differ")
    if min(sa) == 0:
        raise DiffkitError(f"--a has shape {sa}: there are no activations to import")
    if ids_arr.kind != "i":
        raise DiffkitError(f"--ids {ids_arr.path} has dtype {ids_arr.dtype}: token ids must be integers")
    if ids_arr.shape != sa[:-1]:
        raise DiffkitError(f"--ids {ids_arr.path} has shape {ids_arr.shape} but the activations have "
                           f"{sa[:-1]} rows: pass the token ids the activations were computed on")
    ids = ids_arr.read_all().astype(np.int64)
    if ids.min() < 0 or ids.max() >= 2**31:
        raise DiffkitError(f"--ids {ids_arr.path} has ids outside 0..2^31-1 (min {ids.min()}, max {ids.max()})")
    if len(sa) == 3:
        ctx = sa[1]
        lengths = np.full(sa[0], ctx, dtype=np.int64)
        if cfg.lengths:
            lengths = _Array(cfg.lengths, "--lengths").read_all()
            if lengths.dtype.kind not in "iu" or lengths.shape != (sa[0],):
                raise DiffkitError(f"--lengths has shape {lengths.shape} dtype {lengths.dtype}: expected ({sa[0]},) "
                                   "integers, the real tokens of each sequence")
            if lengths.min() < 1 or lengths.max() > ctx:
                raise DiffkitError(f"--lengths has values outside 1..{ctx} (min {lengths.min()}, max "
                                   f"{lengths.max()}): a length counts a sequence's real tokens, BOS included")
    else:
        if cfg.lengths or cfg.bos:
            raise DiffkitError("--lengths and --bos apply to per-position (n_seq, ctx, d) arrays; per-row (n, d) "
                               "arrays must already leave out BOS and padding")
        if cfg.ctx < 1:
            raise DiffkitError(f"--ctx {cfg.ctx} must be positive")
        ctx, n = cfg.ctx, sa[0]
        n_seq = -(-n // ctx)
        padded = np.zeros(n_seq * ctx, dtype=np.int64)
        padded[:n] = ids
        ids = padded.reshape(n_seq, ctx)
        lengths = np.full(n_seq, ctx, dtype=np.int64)
        lengths[-1] = n - (n_seq - 1) * ctx
    if cfg.heldout_every < 0 or cfg.heldout_every == 1:
        raise DiffkitError(f"--heldout-every {cfg.heldout_every} leaves no training data: use 0 or 2 or more")
    return arrays, ids, lengths, ctx


def import_store(cfg: ImportConfig, out: Path, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, log: Callable[[str], None] = lambda _: None) -> Any:
    """Write the store at ``out`` from ``cfg``'s arrays; return the collect-style summary."""
    from .progress import tqdm

    from . import __version__
    from .activations import (CollectConfig, _clean_uncommitted, _prepare_out_dir, _seqs_per_shard, _shard_layout,
                              _summary, finish_manifest)
    from .corpora import Sequence
    from .store_format import FORMAT_VERSION, STORE_KIND, shard_files, write_manifest
    from .io import atomic_save_npy

    t0 = time.time()
    out = Path(out)
    arrays, ids, lengths, ctx = _check_inputs(cfg)
    start = 1 if cfg.bos else 0
    keeps = [np.arange(start, int(n), dtype=np.int64) for n in lengths]
    n_rows = int(sum(len(k) for k in keeps))
    if n_rows == 0:
        raise DiffkitError("no rows left to import: every sequence is only BOS (check --lengths and --bos)")
    d = {src: int(arr.shape[-1]) for src, arr in arrays.items()}
    stamp = {src: {"bytes": arr.path.stat().st_size, "mtime_ns": arr.path.stat().st_mtime_ns}
             for src, arr in arrays.items()}
    collect = CollectConfig(model_a=cfg.model_a or f"imported:{arrays['a'].path.name}",
                            model_b=cfg.model_b or f"imported:{arrays['b'].path.name}", hook_a=cfg.hook_a,
                            hook_b=cfg.hook_b, corpus=f"imported:{Path(cfg.ids).name}", tokens=n_rows, ctx=ctx,
                            dtype=cfg.dtype, shard_mb=cfg.shard_mb, heldout_every=cfg.heldout_every)
    manifest = _prepare_out_dir(out, collect, resume, overwrite)
    if manifest is not None and manifest.get("import") != {**asdict(cfg), "files": stamp}:
        raise DiffkitError(f"cannot resume {out}: it was not imported from these files with these options (or they "
                           "changed on disk); use --overwrite")
    if overwrite and out.exists():
        shutil.rmtree(out)
    sources = {src: {"spec": getattr(collect, f"model_{src}"), "source": f"imported from {arrays[src].path}",
                     "d_model": d[src], "hook": getattr(collect, f"hook_{src}")} for src in ("a", "b")}
    if manifest is None:
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"kind": STORE_KIND, "format_version": FORMAT_VERSION, "diffkit_version": __version__,
                    "config": asdict(collect), "complete": False, "seqs_per_shard": _seqs_per_shard(collect, max(d.values())),
                    "has_bos": cfg.bos, "shards": [], "sources": sources, "import": {**asdict(cfg), "files": stamp}}
        write_manifest(out, manifest)
    elif manifest["complete"]:
        log(f"{out} is already complete; nothing to resume")
        return _summary(out, manifest, time.time() - t0, len(manifest["shards"]))
    else:
        _clean_uncommitted(out, manifest)
    per_shard = manifest["seqs_per_shard"]
    done = len(manifest["shards"])
    per_position = len(arrays["a"].shape) == 3
    bar = tqdm(total=n_rows, initial=sum(s["n_tokens"] for s in manifest["shards"]), unit="tok", unit_scale=True,
               desc="import", disable=not progress)
    try:
        for index, seq_start in enumerate(range(done * per_shard, len(ids), per_shard), start=done):
            seq_stop = min(seq_start + per_shard, len(ids))
            chunk = [(Sequence(ids[s], int(lengths[s])), keeps[s]) for s in range(seq_start, seq_stop)]
            tok, flat, n_train = _shard_layout(chunk, seq_start, collect)
            record = {"index": index, "seq_start": seq_start, "n_seqs": len(chunk), "n_tokens": int(len(flat)),
                      "n_train": n_train, "norm_sum": {}, "files": {}}
            tensors = {"ids": tok, "pos": flat}
            for src, arr in arrays.items():
                if per_position:
                    block = arr.read(seq_start, seq_stop).reshape(-1, d[src])
                else:
                    block = arr.read(seq_start * ctx, min(seq_stop * ctx, arr.shape[0]))
                rows = block[flat].astype(cfg.dtype, copy=False)
                bad = ~np.isfinite(rows).all(axis=1)
                if bad.any():
                    seq, pos = divmod(int(flat[np.argmax(bad)]), ctx)
                    where = (f"sequence {seq_start + seq}, position {pos}" if per_position
                             else f"row {(seq_start + seq) * ctx + pos}")
                    over = " (too large for float16)" if cfg.dtype == "float16" and np.isfinite(block[flat]).all() else ""
                    raise _BadData(f"--{src} {arr.path} has non-finite values (NaN/inf){over} at {where} "
                                   f"({int(bad.sum())} rows in this shard): fix the activations; nothing was imported")
                record["norm_sum"][src] = float(np.linalg.norm(rows[:n_train], axis=1).sum(dtype=np.float64))
                tensors[src] = rows
            names = shard_files(index)
            for key, array in tensors.items():
                record["files"][names[key]] = atomic_save_npy(out / names[key], array)
            manifest["shards"].append(record)
            write_manifest(out, manifest)
            bar.update(len(flat))
    except _BadData as exc:
        bar.close()
        shutil.rmtree(out, ignore_errors=True)  # useless with bad input, and ours: we just wrote it
        raise DiffkitError(str(exc)) from None
    bar.close()
    finish_manifest(manifest, d)
    write_manifest(out, manifest)
    return _summary(out, manifest, time.time() - t0, done)


class _BadData(Exception):
    pass


__all__ = ["ImportConfig", "import_store"]
