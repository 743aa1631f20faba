"""Tokenizers behind one small interface, so the pipeline never cares where a model came from.

The zoo models read raw UTF-8 bytes (256 ids) plus a BOS and a PAD id: no vocabulary file, no
download. Models from the hub or a local HF directory keep their Hugging Face tokenizer, wrapped.
Two models can be paired token by token only when their tokenizers' fingerprints agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

import numpy as np


class Tokenizer(Protocol):
    """What diffkit needs of a tokenizer."""

    name: str
    vocab_size: int
    bos_id: int | None
    pad_id: int

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (int64), without BOS."""

    def decode(self, ids: Any) -> str:
        """Text of a sequence of ids (special ids dropped)."""

    @property
    def fingerprint(self) -> str:
        """Hash of the vocabulary: equal fingerprints mean equal token ids for equal text."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS = 256 and PAD = 257."""

    name = "diffkit-byte-v1"
    vocab_size = 258
    bos_id = 256
    pad_id = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Any) -> str:
        arr = np.asarray(ids, dtype=np.int64).ravel()
        return bytes(int(i) for i in arr if 0 <= i < 256).decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        return self.name

    def to_json(self) -> dict:
        return {"kind": "byte"}


class HFTokenizer:
    """A Hugging Face tokenizer behind the :class:`Tokenizer` interface."""

    def __init__(self, hf_tokenizer: Any, name: str | None = None):
        self.hf = hf_tokenizer
        self.name = name or getattr(hf_tokenizer, "name_or_path", "hf")
        self.vocab_size = len(hf_tokenizer)
        self.bos_id = hf_tokenizer.bos_token_id
        pad = hf_tokenizer.pad_token_id
        if pad is None:  # many causal LMs have no pad token; pad with EOS and exclude by mask
            pad = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self._fingerprint: str | None = None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False), dtype=np.int64)

    def decode(self, ids: Any) -> str:
        return self.hf.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=True)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            vocab = sorted(self.hf.get_vocab().items(), key=lambda kv: kv[1])
            blob = json.dumps([vocab, self.bos_id], ensure_ascii=False).encode()
            self._fingerprint = "hf-" + hashlib.sha256(blob).hexdigest()[:16]
        return self._fingerprint
