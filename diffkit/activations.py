"""ActivationStore: paired activations of two models on the same tokens, on disk.

``collect_activations`` runs model A and model B over the same token sequences, keeps one hook of
each (hooks and widths may differ) and writes sharded ``.npy`` files plus a manifest (format in
:mod:`diffkit.store_format`). ``ActivationStore.open`` reads it back with memory maps: random
access by row, and a shuffled batch iterator whose memory is one batch, whatever the store's size.

Conventions every later stage relies on:

- BOS and padding positions are never stored (BOS activations are outliers by orders of
  magnitude, and were one of the ways the first training-free diff went wrong).
- The split is by sequence: every ``heldout_every``-th sequence of the (shuffled) stream is held
  out. Maps and dictionaries are fitted on ``train`` and scored on ``heldout``.
- Optional per-row labels (the answer key of a planted corpus, ``organism:NAME``): ``labels(split)``
  in the row order of ``iter_shards`` / ``iter_batches(shuffle=False)``; names in
  ``manifest["labels"]["names"]``. Stores without them open as before (``has_labels`` False).
- Raw activations are stored. Each model's normalization scale ``sqrt(d_model) / mean ||x||``
  (mean over train tokens, BOS excluded) is in the manifest and applied on read when
  ``normalized=True``, so a normalized row has mean norm ``sqrt(d_model)``.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import OrderedDict
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import __version__
from .corpora import Sequence, kept_positions, token_sequences
from .organisms import label_names
from .errors import DiffkitError
from .io import atomic_save_npy
from .store_format import (FORMAT_VERSION, MANIFEST, SOURCES, STORE_KIND, check_shard_file, load_npy, read_manifest,
                           shard_files, validate_manifest, write_manifest)

SPLITS = ("train", "heldout", "all")
DTYPES = ("float32", "float16")
MAX_OPEN_MAPS = 256  # 4 files per shard: a shuffle window of 8 shards needs 16 (a, b), far below fd limits


@dataclass(frozen=True)
class CollectConfig:
    """Everything that determines a store's contents (saved in its manifest)."""

    model_a: str
    model_b: str
    hook_a: str
    hook_b: str
    corpus: str
    tokens: int
    corpus_split: str = "all"
    ctx: int = 128
    seed: int = 0
    batch_size: int = 32
    shard_mb: float = 32.0
    dtype: str = "float32"
    heldout_every: int = 10
    # Drop a token whose activation norm, in either model, exceeds this multiple of the median norm
    # of its own sequence (0: keep every token). Some LMs put "massive activations" on a few tokens
    # (SmolLM2-135M at layer 15: 0.02% of tokens at ~150x the median norm, 65% of the variance);
    # left in, they dominate the map fit, the SAEs' and crosscoder's losses and the stored scale.
    max_norm_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise DiffkitError(f"--tokens must be positive, got {self.tokens}")
        if self.batch_size <= 0:
            raise DiffkitError(f"--batch-size must be positive, got {self.batch_size}")
        if self.shard_mb <= 0:
            raise DiffkitError(f"--shard-mb must be positive, got {self.shard_mb}")
        if self.dtype not in DTYPES:
            raise DiffkitError(f"--dtype {self.dtype!r} is not supported: use one of {', '.join(DTYPES)}")
        if self.max_norm_ratio < 0 or 0 < self.max_norm_ratio <= 1:
            raise DiffkitError(f"--max-norm-ratio {self.max_norm_ratio} would drop ordinary tokens: use 0 (keep all) "
                               "or a multiple of the median norm above 1, e.g. 10")
        if self.heldout_every < 0 or self.heldout_every == 1:
            raise DiffkitError(f"--heldout-every {self.heldout_every} leaves no training data: use 0 (no "
                               "held-out split) or 2 or more")


@dataclass(frozen=True)
class CollectSummary:
    out: str
    tokens: int
    train_tokens: int
    heldout_tokens: int
    shards: int
    bytes: int
    scale_a: float
    scale_b: float
    seconds: float
    resumed_shards: int
    massive_dropped: int = 0  # tokens left out by max_norm_ratio

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def is_heldout(seq_index: int, heldout_every: int) -> bool:
    return heldout_every > 0 and seq_index % heldout_every == heldout_every - 1


def _seqs_per_shard(cfg: CollectConfig, d_max: int) -> int:
    bytes_per_seq = cfg.ctx * d_max * np.dtype(cfg.dtype).itemsize
    return max(1, int(cfg.shard_mb * 2**20 // bytes_per_seq))


def plan_sequences(cfg: CollectConfig, tokenizer: Any) -> Iterator[tuple[Sequence, np.ndarray]]:
    """The sequences to collect with their kept positions, trimmed so the total is exactly ``tokens``."""
    has_bos = tokenizer.bos_id is not None
    remaining = cfg.tokens
    for seq in token_sequences(cfg.corpus, tokenizer, cfg.ctx, split=cfg.corpus_split, seed=cfg.seed):
        keep = kept_positions(seq, has_bos)[:remaining]
        if len(keep) == 0:
            continue
        yield seq, keep
        remaining -= len(keep)
        if remaining == 0:
            return


def count_available_tokens(cfg: CollectConfig, tokenizer: Any) -> int:
    """Kept tokens the corpus offers, up to ``cfg.tokens`` (a tokenization pass, no forward)."""
    return sum(len(keep) for _, keep in plan_sequences(cfg, tokenizer))


def _prepare_out_dir(out: Path, cfg: CollectConfig, resume: bool, overwrite: bool) -> dict | None:
    """Return the manifest to resume from (or None for a fresh start); refuse to clobber.

    Deletes nothing: with ``overwrite`` the caller removes the old store once the inputs validate.
    """
    if resume and overwrite:
        raise DiffkitError("--resume and --overwrite contradict each other: pass one of them")
    if out.exists() and not out.is_dir():
        raise DiffkitError(f"--out {out} is a file: pass a directory path")
    has_manifest = (out / MANIFEST).exists()
    if resume and out.is_dir() and not has_manifest and all(p.name.endswith(".tmp") for p in out.iterdir()):
        for path in out.iterdir():  # killed before its first manifest: nothing to keep, start afresh
            path.unlink()
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if not has_manifest:
                raise DiffkitError(f"--out {out} is not empty and is not an activation store: refusing to delete "
                                   "it; choose another --out")
            read_manifest(out)  # only what is recognisably ours is deleted, and only after validation
        elif resume:
            if not has_manifest:
                raise DiffkitError(f"cannot resume: {out} has no {MANIFEST}; drop --resume or choose another --out")
            manifest = read_manifest(out)
            saved = manifest["config"]
            saved = {**{f.name: f.default for f in fields(CollectConfig) if f.default is not MISSING}, **saved}
            diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
            if diff:
                shown = ", ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                raise DiffkitError(f"cannot resume {out}: the options differ from the interrupted run ({shown}); "
                                   "repeat its options or use --overwrite")
            return manifest
        else:
            raise DiffkitError(f"--out {out} already exists: pass --resume to continue it or --overwrite to "
                               "replace it")
    elif resume and not out.exists():
        raise DiffkitError(f"cannot resume: {out} does not exist; drop --resume")
    return None  # --resume of an empty folder (a run killed before it wrote anything) starts afresh


def _config_fields(saved: dict) -> dict:
    """The CollectConfig fields of a manifest's config; one written before a field existed gets its default."""
    return {f.name: saved[f.name] for f in fields(CollectConfig) if f.name in saved or f.default is MISSING}


def _massive_rows(rows: dict[str, np.ndarray], flat: np.ndarray, ctx: int, ratio: float) -> np.ndarray:
    """Rows whose norm in either source exceeds ``ratio`` x the median norm of their own sequence."""
    seq = flat // ctx
    drop = np.zeros(len(flat), dtype=bool)
    for array in rows.values():
        norms = np.linalg.norm(array.astype(np.float32, copy=False), axis=1)
        order = np.argsort(seq, kind="stable")
        bounds = np.flatnonzero(np.diff(seq[order])) + 1
        median = np.empty_like(norms)
        for group in np.split(order, bounds):
            median[group] = np.median(norms[group])
        drop |= norms > ratio * median
    return drop


def _clean_uncommitted(out: Path, manifest: dict) -> None:
    """Remove shard files of a killed run that the manifest does not list (and temp files)."""
    listed = {rel for shard in manifest["shards"] for rel in shard["files"]}
    for sub in ("tokens", *SOURCES, "labels"):
        folder = out / sub
        if folder.exists():
            for path in folder.iterdir():
                if f"{sub}/{path.name}" not in listed:
                    path.unlink()


def _forward_rows(model: Any, hook: str, ids: np.ndarray, flat_pos: np.ndarray, batch_size: int,
                  device: str, label: str, seq_offset: int, out_dtype: str) -> np.ndarray:
    """Activations at ``hook`` for the stored positions of ``ids``, as an (n_rows, d) array."""
    import torch

    from .forward import hook_activations

    ctx = ids.shape[1]
    rows = None
    for start in range(0, len(ids), batch_size):
        batch = torch.from_numpy(ids[start:start + batch_size].astype(np.int64)).to(device)
        act = hook_activations(model, batch, hook).float().cpu()
        act = act.reshape(-1, act.shape[-1])
        if rows is None:
            rows = torch.empty(len(flat_pos), act.shape[1])
        lo, hi = start * ctx, (start + len(batch)) * ctx
        here = np.nonzero((flat_pos >= lo) & (flat_pos < hi))[0]  # output rows that this batch fills
        rows[torch.from_numpy(here)] = act[torch.from_numpy(flat_pos[here] - lo)]
    if not torch.isfinite(rows).all():
        bad = int(torch.nonzero(~torch.isfinite(rows).all(dim=1))[0])
        seq, pos = divmod(int(flat_pos[bad]), ctx)
        raise DiffkitError(f"model {label} gives non-finite activations at {hook} for sequence "
                           f"{seq_offset + seq}, position {pos} (token id {int(ids[seq, pos])}): check the "
                           "model's weights and dtype; collection stopped, finished shards are kept")
    return rows.numpy().astype(out_dtype, copy=False)


def _shard_labels(seqs: list[tuple[Sequence, np.ndarray]], flat: np.ndarray, ctx: int, n_names: int) -> np.ndarray:
    """The label of each stored row (flat positions into the shard's token matrix); 0 where a row has none."""
    dtype = np.uint8 if n_names <= 256 else np.int16
    mat = np.zeros((len(seqs), ctx), dtype=dtype)
    for row, (seq, _) in enumerate(seqs):
        if seq.labels is not None:
            if int(seq.labels.max(initial=0)) >= n_names:
                raise DiffkitError(f"corpus label {int(seq.labels.max())} has no name (the corpus names {n_names}): "
                                   "the corpus and its label names disagree")
            mat[row] = seq.labels
    return mat.reshape(-1)[flat]


def _shard_layout(seqs: list[tuple[Sequence, np.ndarray]], seq_start: int, cfg: CollectConfig):
    """Token matrix and flat row positions of one shard, training sequences' rows first."""
    ids = np.stack([s.ids for s, _ in seqs]).astype(np.int32)
    train, held = [], []
    for row, (_, keep) in enumerate(seqs):
        (held if is_heldout(seq_start + row, cfg.heldout_every) else train).append(row * cfg.ctx + keep)
    n_train = int(sum(len(p) for p in train))
    flat = np.concatenate(train + held).astype(np.int64) if (train or held) else np.zeros(0, np.int64)
    return ids, flat, n_train


def collect_activations(cfg: CollectConfig, out: Path, resume: bool = False, overwrite: bool = False,
                        device: str = "cpu", progress: bool = True,
                        log: Callable[[str], None] = lambda _: None) -> CollectSummary:
    """Run both models over the corpus and write (or finish) the store at ``out``."""
    import torch
    from .progress import tqdm

    from .forward import stop_layer
    from .models import load_model

    out = Path(out)
    t0 = time.time()
    manifest = _prepare_out_dir(out, cfg, resume, overwrite)
    model_a = load_model(cfg.model_a, device)
    model_b = load_model(cfg.model_b, device)
    if model_a.tokenizer.fingerprint != model_b.tokenizer.fingerprint:
        raise DiffkitError(f"models {cfg.model_a} and {cfg.model_b} use different tokenizers "
                           f"({model_a.tokenizer.name} vs {model_b.tokenizer.name}): their activations cannot be "
                           "paired token by token; diff models that share a tokenizer")
    for loaded, hook in ((model_a, cfg.hook_a), (model_b, cfg.hook_b)):
        stop_layer(loaded.model, hook)  # raises with the list of valid hooks
        if cfg.ctx > loaded.model.cfg.n_ctx:
            raise DiffkitError(f"--ctx {cfg.ctx} exceeds {loaded.spec}'s context length {loaded.model.cfg.n_ctx}: "
                               f"pass --ctx {loaded.model.cfg.n_ctx} or less")
    sources = {"a": {**model_a.describe(), "hook": cfg.hook_a}, "b": {**model_b.describe(), "hook": cfg.hook_b}}
    if manifest is not None:
        changed = [f"model {src.upper()} {key}" for src in sources for key in sources[src]
                   if manifest["sources"][src].get(key) != sources[src][key]]
        if changed:
            raise DiffkitError(f"cannot resume {out}: {', '.join(changed)} differ from the interrupted run (the "
                               "model changed on disk?); use --overwrite to collect again")
    tokenizer = model_a.tokenizer
    available = count_available_tokens(cfg, tokenizer)
    if available < cfg.tokens:
        raise DiffkitError(f"corpus {cfg.corpus!r} (split {cfg.corpus_split}) has only {available:,} usable tokens at "
                           f"ctx {cfg.ctx}, fewer than --tokens {cfg.tokens:,}: lower --tokens or use a larger corpus")
    if overwrite and out.exists():
        shutil.rmtree(out)
    d = {"a": model_a.d_model, "b": model_b.d_model}
    per_shard = _seqs_per_shard(cfg, max(d.values()))
    if manifest is None:
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"kind": STORE_KIND, "format_version": FORMAT_VERSION, "diffkit_version": __version__,
                    "config": asdict(cfg), "complete": False, "seqs_per_shard": per_shard,
                    "has_bos": tokenizer.bos_id is not None, "shards": [],
                    "sources": sources}
        names = label_names(cfg.corpus)
        if names is not None:
            manifest["labels"] = {"names": names, "meaning": "0 = ordinary text, 1.. = planted (the corpus's markup)"}
        write_manifest(out, manifest)
    else:
        if manifest["complete"]:
            log(f"{out} is already complete; nothing to resume")
            return _summary(out, manifest, time.time() - t0, len(manifest["shards"]))
        _clean_uncommitted(out, manifest)
    per_shard = manifest["seqs_per_shard"]  # a resumed run keeps the shard size it started with
    done_shards = len(manifest["shards"])
    done_seqs = sum(s["n_seqs"] for s in manifest["shards"])
    done_tokens = sum(s["n_tokens"] for s in manifest["shards"])

    models = {"a": (model_a, cfg.hook_a), "b": (model_b, cfg.hook_b)}
    bar = tqdm(total=cfg.tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="collect",
               disable=not progress)
    plan = plan_sequences(cfg, tokenizer)
    for _ in range(done_seqs):
        next(plan)
    index, seq_start = done_shards, done_seqs
    with torch.inference_mode():
        while True:
            chunk = [item for _, item in zip(range(per_shard), plan)]
            if not chunk:
                break
            ids, flat, n_train = _shard_layout(chunk, seq_start, cfg)
            n_names = len(manifest["labels"]["names"]) if "labels" in manifest else 0
            names = shard_files(index, labels=bool(n_names))
            record = {"index": index, "seq_start": seq_start, "n_seqs": len(chunk), "n_tokens": int(len(flat)),
                      "n_train": n_train, "norm_sum": {}, "files": {}}
            rows = {src: _forward_rows(loaded.model, hook, ids, flat, cfg.batch_size, device, src.upper(),
                                       seq_start, cfg.dtype) for src, (loaded, hook) in models.items()}
            labels = _shard_labels(chunk, flat, cfg.ctx, n_names) if n_names else None
            if cfg.max_norm_ratio:
                drop = _massive_rows(rows, flat, cfg.ctx, cfg.max_norm_ratio)
                labels = labels[~drop] if labels is not None else None
                flat, n_train = flat[~drop], n_train - int(drop[:n_train].sum())
                rows = {src: array[~drop] for src, array in rows.items()}
                record.update(n_tokens=int(len(flat)), n_train=n_train, n_massive=int(drop.sum()))
            tensors = {"ids": ids, "pos": flat, **({"labels": labels} if labels is not None else {})}
            for src, array in rows.items():
                # Row norms in float32, summed in float64: no shard-sized float64 copy.
                record["norm_sum"][src] = float(np.linalg.norm(array[:n_train], axis=1).sum(dtype=np.float64))
                tensors[src] = array
            for key, array in tensors.items():
                record["files"][names[key]] = atomic_save_npy(out / names[key], array)
            manifest["shards"].append(record)
            write_manifest(out, manifest)  # the shard exists only once listed here
            bar.update(len(flat))
            index += 1
            seq_start += len(chunk)
    bar.close()
    finish_manifest(manifest, d)
    write_manifest(out, manifest)
    return _summary(out, manifest, time.time() - t0, done_shards)


def finish_manifest(manifest: dict, d: dict[str, int]) -> None:
    shards = manifest["shards"]
    n_train = sum(s["n_train"] for s in shards)
    n_all = sum(s["n_tokens"] for s in shards)
    manifest["n_tokens"] = {"train": n_train, "heldout": n_all - n_train, "all": n_all}
    rows = n_train if n_train else n_all
    manifest["scale"] = {}
    for src in SOURCES:
        mean_norm = sum(s["norm_sum"][src] for s in shards) / max(1, rows)
        manifest["scale"][src] = math.sqrt(d[src]) / mean_norm if mean_norm > 0 else 1.0
    manifest["scale_formula"] = "sqrt(d_model) / mean_t ||x_t|| over train tokens (BOS and padding excluded)"
    manifest["complete"] = True


def store_bytes(manifest: dict) -> int:
    """The bytes of every shard file a store's manifest lists."""
    return sum(f["bytes"] for s in manifest["shards"] for f in s["files"].values())


def _summary(out: Path, manifest: dict, seconds: float, resumed: int) -> CollectSummary:
    n = manifest["n_tokens"]
    return CollectSummary(str(out), n["all"], n["train"], n["heldout"], len(manifest["shards"]), store_bytes(manifest),
                          manifest["scale"]["a"], manifest["scale"]["b"], seconds, resumed,
                          sum(int(s.get("n_massive", 0)) for s in manifest["shards"]))


def store_summary(store: "ActivationStore") -> CollectSummary:
    """A complete store's summary, as ``collect_activations`` returns it (no collection time: tokens/s NaN)."""
    return _summary(store.root, store.manifest, 0.0, 0)


class ActivationStore:
    """Read side of a store. ``open`` checks the manifest; shard files are memory-mapped on demand."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.config = CollectConfig(**_config_fields(manifest["config"]))
        # Open memory maps, least recently used first; bounded because each holds a file descriptor.
        self._arrays: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        shards = manifest["shards"]
        self._n_train = np.array([s["n_train"] for s in shards], dtype=np.int64)
        self._n_all = np.array([s["n_tokens"] for s in shards], dtype=np.int64)

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, verify: str = "size") -> "ActivationStore":
        """Open a complete store. ``verify``: "size" (default; cheap), "full" (sha256 of every file) or "none"."""
        root = Path(root)
        manifest = read_manifest(root)
        if not manifest["complete"]:
            raise DiffkitError(f"activation store {root} is incomplete (collection was interrupted): run the same "
                               "`diffkit collect` command with --resume")
        if verify not in ("size", "full", "none"):
            raise DiffkitError(f"verify={verify!r}: use 'size', 'full' or 'none'")
        try:
            validate_manifest(manifest)
            store = cls(root, manifest)
            for shard in manifest["shards"]:
                for rel, record in shard["files"].items():
                    if verify != "none":
                        check_shard_file(root, rel, record, verify)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise DiffkitError(f"{root / MANIFEST} is malformed (bad or missing field {str(exc)[:160]}): collect "
                               "the store again") from None
        return store

    # -- facts ---------------------------------------------------------------------------------
    def d_model(self, source: str) -> int:
        return int(self.manifest["sources"][source]["d_model"])

    def hook(self, source: str) -> str:
        return self.manifest["sources"][source]["hook"]

    def scale(self, source: str) -> float:
        return float(self.manifest["scale"][source])

    @property
    def has_labels(self) -> bool:
        """Whether the store carries a per-row answer key (``labels``)."""
        return "labels" in self.manifest

    @property
    def label_names(self) -> list[str]:
        """Label names, index = label value (``[]`` without labels)."""
        return list(self.manifest["labels"]["names"]) if self.has_labels else []

    def labels(self, split: str = "train") -> np.ndarray:
        """(n_rows,) int64 label of every row of ``split``, in the order of ``iter_shards(split)`` and
        ``iter_batches(split=split, shuffle=False)`` (0 = ordinary text, 1.. = planted: ``label_names``)."""
        if not self.has_labels:
            raise DiffkitError(f"activation store {self.root} has no per-token labels: collect it from a labelled "
                               "corpus (e.g. --corpus organism:backdoor)")
        start, stop = self._split_bounds(split)
        parts = [np.asarray(self._array(s, "labels")[start[s]:stop[s]], dtype=np.int64) for s in range(self.n_shards)]
        out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        n = len(self.label_names)
        if out.size and (int(out.min()) < 0 or int(out.max()) >= n):
            raise DiffkitError(f"activation store {self.root} has labels outside 0..{n - 1} (its names): the label "
                               "files are damaged, collect the store again")
        return out

    def n_tokens(self, split: str = "train") -> int:
        _check_split(split)
        return int(self.manifest["n_tokens"][split])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def __repr__(self) -> str:
        n = self.manifest["n_tokens"]
        return (f"ActivationStore({str(self.root)!r}, tokens={n['all']:,} (train {n['train']:,}, heldout "
                f"{n['heldout']:,}), a={self.hook('a')} d={self.d_model('a')}, b={self.hook('b')} d={self.d_model('b')})")

    # -- raw access ----------------------------------------------------------------------------
    def _array(self, shard: int, key: str) -> np.ndarray:
        cached = self._arrays.get((shard, key))
        if cached is None:
            rel = shard_files(shard, labels=True)[key]
            cached = load_npy(self.root, rel, self.manifest["shards"][shard]["files"][rel])
            self._arrays[(shard, key)] = cached
            if len(self._arrays) > MAX_OPEN_MAPS:
                self._arrays.popitem(last=False)
        else:
            self._arrays.move_to_end((shard, key))
        return cached

    def _split_bounds(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Per shard, the [start, stop) row range of ``split``."""
        _check_split(split)
        if split == "train":
            return np.zeros_like(self._n_train), self._n_train
        if split == "heldout":
            return self._n_train, self._n_all
        return np.zeros_like(self._n_all), self._n_all

    def _locate(self, split: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split-relative row indices -> (shard, row within shard)."""
        start, stop = self._split_bounds(split)
        sizes = stop - start
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= offsets[-1]):
            raise DiffkitError(f"row index out of range for split {split!r} with {offsets[-1]} rows")
        shard = np.searchsorted(offsets, indices, side="right") - 1
        return shard, indices - offsets[shard] + start[shard]

    def _gather(self, shard: np.ndarray, row: np.ndarray, normalized: bool) -> tuple[Any, Any]:
        import torch

        out = []
        for src in SOURCES:
            d = self.d_model(src)
            buf = np.empty((len(row), d), dtype=np.float32)
            for s in np.unique(shard):
                sel = np.nonzero(shard == s)[0]
                buf[sel] = self._array(int(s), src)[row[sel]]
            if normalized:  # in numpy: torch's thread pool made this 100x slower on a busy machine
                np.multiply(buf, np.float32(self.scale(src)), out=buf)
            out.append(torch.from_numpy(buf))
        return out[0], out[1]

    def batch(self, indices: Any, split: str = "train", normalized: bool = True) -> tuple[Any, Any]:
        """Rows ``indices`` of ``split`` as float32 tensors (a, b); normalized by the stored scales."""
        shard, row = self._locate(split, np.asarray(indices))
        return self._gather(shard, row, normalized)

    def contexts(self, indices: Any, split: str = "train", window: int = 16) -> list[tuple[np.ndarray, int]]:
        """For each row: the token ids of its sequence up to ``window`` tokens around it, and its offset."""
        shard, row = self._locate(split, np.asarray(indices))
        result = []
        for s, r in zip(shard, row):
            flat = int(self._array(int(s), "pos")[r])
            ids = self._array(int(s), "ids")
            seq, pos = divmod(flat, ids.shape[1])
            lo = max(0, pos - window)
            result.append((np.asarray(ids[seq, lo:pos + window + 1]), pos - lo))
        return result

    def iter_shards(self, split: str = "train", normalized: bool = True) -> Iterator[tuple[Any, Any]]:
        """One (a, b) pair of tensors per shard, in shard order: for streaming statistics."""
        start, stop = self._split_bounds(split)
        for s in range(self.n_shards):
            if stop[s] > start[s]:
                rows = np.arange(start[s], stop[s])
                yield self._gather(np.full(len(rows), s), rows, normalized)

    def iter_batches(self, batch_size: int, split: str = "train", shuffle: bool = True, seed: int = 0,
                     epoch: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                     normalized: bool = True, window: int = 8) -> Iterator[tuple[Any, Any]]:
        """Batches (a, b) covering ``split`` once (one epoch), each row at most once.

        Shuffling: the shard order is permuted, shards are taken ``window`` at a time, and rows are
        drawn in random order across the shards of a window; rows are gathered from the memory
        maps, so memory is one batch whatever the store's size. With ``world_size`` > 1, rank
        ``r`` yields batches r, r + world_size, ... of the same global order (same seed and epoch on
        every rank), so ranks never share a row.
        """
        if batch_size <= 0:
            raise DiffkitError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DiffkitError(f"rank {rank} is outside world size {world_size}")
        start, stop = self._split_bounds(split)
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(self.n_shards) if shuffle else np.arange(self.n_shards)
        carry_shard = np.zeros(0, np.int64)
        carry_row = np.zeros(0, np.int64)
        batch_no = 0
        for w in range(0, len(order), max(1, window)):
            group = order[w:w + window]
            shard = np.concatenate([carry_shard] + [np.full(stop[s] - start[s], s) for s in group])
            row = np.concatenate([carry_row] + [np.arange(start[s], stop[s]) for s in group])
            if shuffle:
                perm = rng.permutation(len(row))
                shard, row = shard[perm], row[perm]
            last_window = w + window >= len(order)
            n_full = len(row) // batch_size
            for i in range(n_full):
                if batch_no % world_size == rank:
                    sl = slice(i * batch_size, (i + 1) * batch_size)
                    yield self._gather(shard[sl], row[sl], normalized)
                batch_no += 1
            carry_shard, carry_row = shard[n_full * batch_size:], row[n_full * batch_size:]
            if last_window and len(carry_row) and not drop_last:
                if batch_no % world_size == rank:
                    yield self._gather(carry_shard, carry_row, normalized)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DiffkitError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
