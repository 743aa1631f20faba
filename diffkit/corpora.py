"""Text that ships with Python, or the user's own, turned into fixed-length token sequences.

Named corpora (no downloads, no extra dependency):

- ``prose``: the English documentation topics of ``pydoc_data.topics`` (~465k characters).
- ``code``: the Python standard library's own ``.py`` sources (tests and vendored copies excluded).
- ``mixed``: sequences alternating between ``prose`` and ``code`` (so a small sample holds both
  domains in equal parts; once prose runs out the rest is code).

Each named corpus is split by document into ``train`` (~90%) and ``heldout`` (~10%) by a hash of
the document name, so the split never changes when documents are added elsewhere.

A user's corpus is a text file (one document), a directory (every UTF-8 file beneath it, one
document each) or a ``.npy`` array of token ids: 2-D ``(n_seq, ctx)`` rows used as they are, or
1-D, cut into sequences. Also (see :func:`extra_documents`):

- a ``.jsonl`` file (one document per record, its ``text`` field) or a **glob** of text / jsonl
  files (``'data/**/*.jsonl'``); ``SOURCE#FIELD`` names another field (``notes.jsonl#body``);
- a **Hugging Face dataset**: ``hf:NAME[:CONFIG][@SPLIT][#FIELD]`` from the hub (e.g.
  ``hf:roneneldan/TinyStories@train[:20000]``), ``hf:DIR`` for a local folder of data files
  (``load_dataset(DIR)``), or a ``save_to_disk`` folder (with or without ``hf:``). SPLIT defaults
  to ``train``; the text column is read whole, so slice large splits (``@train[:5%]``).

Sequences are rows of ``ctx`` ids: BOS (when the tokenizer has one), then up to ``ctx - 1`` tokens
of one document, then padding. A document longer than that gives several rows. ``length`` says
how many leading ids are real, so padding is never mistaken for text (some tokenizers pad with EOS).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import DiffkitError
from .tokenizer import Tokenizer

NAMED_CORPORA = ("prose", "code", "mixed")
SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.1

# Standard-library folders that are tests, vendored third-party code or generated tables.
_CODE_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__",
                       "turtledemo", "ensurepip", "_vendor"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Sequence:
    """One row of token ids; ``ids[:length]`` are real, the rest padding. ``labels`` (optional, one per
    id): the corpus's answer key, 0 = ordinary text, 1.. = planted (:mod:`diffkit.organisms`)."""

    ids: np.ndarray
    length: int
    labels: np.ndarray | None = None


def _in_heldout(name: str, fraction: float = HELDOUT_FRACTION) -> bool:
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def _select_split(docs: Iterable[Document], split: str) -> Iterator[Document]:
    if split not in SPLITS:
        raise DiffkitError(f"unknown corpus split {split!r}: use one of {', '.join(SPLITS)}")
    for doc in docs:
        if split == "all" or (split == "heldout") == _in_heldout(doc.name):
            yield doc


def prose_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{key}", topics[key]) for key in sorted(topics)]


def code_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _CODE_EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            docs.append(Document(f"stdlib:{rel.as_posix()}", path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def user_documents(path: Path) -> list[Document]:
    if path.is_file():
        try:
            return [Document(path.name, path.read_text(encoding="utf-8"))]
        except UnicodeDecodeError:
            raise DiffkitError(f"corpus file {path} is not UTF-8 text: pass a text file, a directory "
                               "of text files or a .npy array of token ids") from None
    docs = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            docs.append(Document(file.relative_to(path).as_posix(), file.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # binaries in a folder of text are skipped, not fatal
    return docs


def documents(corpus: str, split: str = "all") -> list[Document]:
    """The documents of a named corpus or a text path, restricted to ``split``."""
    if corpus == "prose":
        docs = prose_documents()
    elif corpus == "code":
        docs = code_documents()
    elif corpus == "mixed":
        raise DiffkitError("'mixed' is a sequence-level mix: use token_sequences(), not documents()")
    elif (extra := extra_documents(corpus)) is not None:  # jsonl, globs, datasets
        docs = extra
    else:
        path = Path(corpus)
        if not path.exists():
            raise DiffkitError(f"corpus {corpus!r} is neither a named corpus ({', '.join(NAMED_CORPORA)}) "
                               "nor an existing path, a glob or hf:DATASET: check the spelling or the path")
        docs = user_documents(path)
    docs = list(_select_split(docs, split))
    if not any(d.text.strip() for d in docs):
        raise DiffkitError(f"corpus {corpus!r} (split {split}) has no text: point --corpus at text files")
    return docs


TEXT_FIELD = "text"
DATASET_PREFIX = "hf:"


def _text_of(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
        raise DiffkitError(f"{where} has no text field {field!r} (it has {keys}): name the field as SOURCE#FIELD")
    text = record[field]
    if not isinstance(text, str):
        raise DiffkitError(f"{where}: field {field!r} holds {type(text).__name__}, not text: name a text field as "
                           "SOURCE#FIELD")
    return text


def jsonl_documents(path: Path, field: str = TEXT_FIELD, name: str | None = None) -> list[Document]:
    """One document per JSON line of ``path`` (its ``field``); blank lines are skipped."""
    import json

    docs = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DiffkitError(f"{path}:{lineno} is not a JSON object ({exc.msg}): write one JSON "
                                       "object per line") from None
                docs.append(Document(f"{name or path.name}:{lineno}", _text_of(record, field, f"{path}:{lineno}")))
    except UnicodeDecodeError:
        raise DiffkitError(f"corpus file {path} is not UTF-8 text") from None
    return docs


def glob_documents(pattern: str, field: str = TEXT_FIELD) -> list[Document]:
    """Documents of every file matching ``pattern`` (``**`` recurses): ``.jsonl`` by record, others whole.

    Names are relative to the pattern's fixed leading folder, so the train/held-out split does not
    depend on where the data lives.
    """
    import glob
    import os

    files = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise DiffkitError(f"corpus glob {pattern!r} matches no files: check the pattern (quote it in the shell)")
    fixed = [part for part in Path(pattern).parts]
    base = Path(*fixed[:next(i for i, part in enumerate(fixed) if glob.has_magic(part))] or ["."])
    docs: list[Document] = []
    for file in map(Path, files):
        rel = Path(os.path.relpath(file, base)).as_posix()
        if file.suffix == ".jsonl":
            docs += jsonl_documents(file, field, name=rel)
        else:
            try:
                docs.append(Document(rel, file.read_text(encoding="utf-8")))
            except UnicodeDecodeError:
                raise DiffkitError(f"corpus file {file} (matched by {pattern!r}) is not UTF-8 text: narrow the "
                                   "glob to text or .jsonl files") from None
    return docs


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                     and (path / "dataset_info.json").is_file())


def dataset_documents(spec: str, field: str = TEXT_FIELD) -> list[Document]:
    """Documents of a Hugging Face dataset: ``NAME[:CONFIG][@SPLIT]`` (hub), a local data folder, or a
    ``save_to_disk`` folder; one document per row (its ``field``)."""
    source, _, split = spec.partition("@")
    local = Path(source)
    config = None
    if not local.exists() and ":" in source:
        source, _, config = source.partition(":")
    try:
        import datasets
    except ImportError:
        raise DiffkitError("Hugging Face datasets is not installed: pip install datasets (it comes with sae-lens)") \
            from None
    try:
        if local.is_dir() and _is_saved_dataset(local):
            ds = datasets.load_from_disk(str(local))
            if split and isinstance(ds, datasets.DatasetDict):
                ds = ds[split] if split in ds else _bad_split(spec, split, list(ds))
        else:
            ds = datasets.load_dataset(source, config, split=split or None)
    except DiffkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, network, builder and split errors come in many types
        from .io import first_line

        where = f"local folder {source}" if local.exists() else f"dataset {source!r} on the Hugging Face hub"
        raise DiffkitError(f"cannot load {where} ({first_line(exc)}): check the name, split and network (offline, "
                           "pass a local folder or a save_to_disk folder instead)") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else _bad_split(spec, "train", list(ds))
    if isinstance(ds, datasets.IterableDataset) or not hasattr(ds, "column_names"):
        raise DiffkitError(f"dataset {spec!r} is not a map-style dataset: save a slice with save_to_disk and pass its folder")
    if field not in ds.column_names:
        raise DiffkitError(f"dataset {spec!r} has no column {field!r} (it has {', '.join(ds.column_names[:8])}): name "
                           f"the text column as {DATASET_PREFIX}{spec}#COLUMN")
    texts = ds[field]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise DiffkitError(f"dataset {spec!r}: column {field!r} holds {type(bad).__name__}, not text: name a text column")
    label = f"{DATASET_PREFIX}{Path(source).name if local.exists() else source}:{split or 'train'}"
    return [Document(f"{label}:{i}", text) for i, text in enumerate(texts)]


def _bad_split(spec: str, split: str, splits: list[str]):
    raise DiffkitError(f"dataset {spec!r} has no split {split!r} (it has {', '.join(splits)}): add @SPLIT")


def extra_documents(corpus: str) -> list[Document] | None:
    """Documents of a jsonl file, a glob, or a dataset spec (module docstring); None for other corpora.

    An existing path is taken literally; otherwise a trailing ``#FIELD`` names the text field.
    """
    if corpus.startswith(DATASET_PREFIX):
        source, _, field = corpus[len(DATASET_PREFIX):].partition("#")
        return dataset_documents(source, field or TEXT_FIELD)
    import glob

    source, field = (corpus, "") if Path(corpus).exists() else (corpus.rpartition("#")[0] or corpus,
                                                                corpus.rpartition("#")[2] if "#" in corpus else "")
    path = Path(source)
    if path.is_dir() and _is_saved_dataset(path):
        return dataset_documents(source, field or TEXT_FIELD)
    if path.is_file() and path.suffix == ".jsonl":
        return jsonl_documents(path, field or TEXT_FIELD)
    if not path.exists() and glob.has_magic(source):
        return glob_documents(source, field or TEXT_FIELD)
    if field and path.exists():
        raise DiffkitError(f"corpus {corpus!r}: #FIELD applies to .jsonl files, globs and datasets, not to {source}")
    return None


def _rows_of(ids: np.ndarray, ctx: int, bos_id: int | None, pad_id: int) -> Iterator[Sequence]:
    body = ctx - 1 if bos_id is not None else ctx
    for start in range(0, len(ids), body):
        piece = ids[start:start + body]
        row = np.full(ctx, pad_id, dtype=np.int64)
        offset = 0
        if bos_id is not None:
            row[0] = bos_id
            offset = 1
        row[offset:offset + len(piece)] = piece
        # A row needs at least one real token after BOS to be worth a forward pass.
        if len(piece) > 0:
            yield Sequence(row, offset + len(piece))


def _doc_sequences(docs: list[Document], tokenizer: Tokenizer, ctx: int, seed: int) -> Iterator[Sequence]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    for i in order:
        yield from _rows_of(tokenizer.encode(docs[i].text), ctx, tokenizer.bos_id, tokenizer.pad_id)


def _shuffled(stream: Iterator[Sequence], seed: int, buffer: int = 2048) -> Iterator[Sequence]:
    """Shuffle a stream within a bounded buffer: rows of one long document get spread out."""
    rng = random.Random(seed + 1)
    pool: list[Sequence] = []
    for item in stream:
        pool.append(item)
        if len(pool) >= buffer:
            j = rng.randrange(len(pool))
            pool[j], pool[-1] = pool[-1], pool[j]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def _npy_sequences(path: Path, tokenizer: Tokenizer, ctx: int) -> Iterator[Sequence]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DiffkitError(f"cannot read token array {path}: {exc}; save it with numpy.save") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise DiffkitError(f"token array {path} has dtype {arr.dtype}: token ids must be integers")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= tokenizer.vocab_size):
        raise DiffkitError(f"token array {path} has ids outside 0..{tokenizer.vocab_size - 1}: it was made "
                           "with another tokenizer")
    if arr.ndim == 2:
        if arr.shape[1] != ctx:
            raise DiffkitError(f"token array {path} has rows of {arr.shape[1]} tokens but --ctx is {ctx}: "
                               f"pass --ctx {arr.shape[1]}")
        for row in arr:
            yield Sequence(np.asarray(row, dtype=np.int64), ctx)
    elif arr.ndim == 1:
        yield from _rows_of(np.asarray(arr, dtype=np.int64), ctx, tokenizer.bos_id, tokenizer.pad_id)
    else:
        raise DiffkitError(f"token array {path} has {arr.ndim} dimensions: expected 1-D ids or 2-D (n_seq, ctx)")


def token_sequences(corpus: str, tokenizer: Tokenizer, ctx: int, split: str = "all",
                    seed: int = 0) -> Iterator[Sequence]:
    """A deterministic stream of sequences: same arguments, same rows in the same order."""
    if ctx < 2:
        raise DiffkitError(f"context length {ctx} is too short: use --ctx 2 or more")
    if corpus.endswith(".npy"):
        path = Path(corpus)
        if not path.exists():
            raise DiffkitError(f"token array {corpus} does not exist: check the path")
        yield from _npy_sequences(path, tokenizer, ctx)
        return
    if corpus.startswith("organism:"):  # planted corpora with per-token labels
        from .organisms import organism_sequences

        yield from organism_sequences(corpus, tokenizer, ctx, split=split, seed=seed)
        return
    if corpus == "mixed":
        streams = [_shuffled(_doc_sequences(documents(name, split), tokenizer, ctx, seed), seed)
                   for name in ("prose", "code")]
        for pair in itertools.zip_longest(*streams):
            yield from (s for s in pair if s is not None)
        return
    yield from _shuffled(_doc_sequences(documents(corpus, split), tokenizer, ctx, seed), seed)


def kept_positions(seq: Sequence, has_bos: bool) -> np.ndarray:
    """Positions whose activations are stored: never BOS (an outlier in norm), never padding."""
    return np.arange(1 if has_bos else 0, seq.length, dtype=np.int64)
