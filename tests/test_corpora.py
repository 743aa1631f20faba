import itertools

import numpy as np
import pytest

from diffkit.corpora import documents, kept_positions, token_sequences
from diffkit.errors import DiffkitError
from diffkit.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def first(corpus, n=50, **kw):
    return list(itertools.islice(token_sequences(corpus, TOK, 32, **kw), n))


def test_sequences_are_deterministic_and_seeded():
    a, b = first("mixed"), first("mixed")
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b))
    c = first("mixed", seed=1)
    assert not all(np.array_equal(x.ids, y.ids) for x, y in zip(a, c))


def test_rows_start_with_bos_and_pad_after_length():
    for seq in first("prose", 200):
        assert seq.ids[0] == TOK.bos_id
        assert (seq.ids[seq.length:] == TOK.pad_id).all()
        assert (seq.ids[1:seq.length] < 256).all()
        keep = kept_positions(seq, has_bos=True)
        assert keep.min() == 1 and keep.max() == seq.length - 1


def test_mixed_alternates_domains():
    texts = [TOK.decode(s.ids) for s in first("mixed", 40)]
    code_like = ["def " in t or "import " in t or "self" in t or "_" in t for t in texts]
    # Odd rows come from the code stream: far more code-like than the even (prose) rows.
    assert sum(code_like[1::2]) > sum(code_like[0::2])


def test_document_split_is_disjoint_and_covers():
    train = {d.name for d in documents("prose", "train")}
    held = {d.name for d in documents("prose", "heldout")}
    every = {d.name for d in documents("prose", "all")}
    assert train and held and not (train & held) and train | held == every


def test_user_text_file_directory_and_npy(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("hello world " * 20)
    (tmp_path / "docs" / "two.md").write_text("other text " * 20)
    (tmp_path / "docs" / "blob.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)  # not UTF-8: skipped
    assert len(documents(str(tmp_path / "docs"))) == 2
    assert len(first(str(tmp_path / "docs" / "one.txt"))) > 0
    ids = np.tile(np.arange(10, 42, dtype=np.int32), (5, 1))
    np.save(tmp_path / "ids.npy", ids)
    rows = first(str(tmp_path / "ids.npy"))
    assert len(rows) == 5 and np.array_equal(rows[0].ids, ids[0])


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "neither a named corpus"),
    (lambda p: (p / "empty.txt").write_text("   ") and str(p / "empty.txt"), "has no text"),
    (lambda p: np.save(p / "f.npy", np.zeros((2, 32), np.float32)) or str(p / "f.npy"), "integers"),
    (lambda p: np.save(p / "big.npy", np.full((2, 32), 999)) or str(p / "big.npy"), "another tokenizer"),
    (lambda p: np.save(p / "ctx.npy", np.zeros((2, 7), np.int64)) or str(p / "ctx.npy"), "--ctx 7"),
])
def test_bad_corpus_is_a_one_line_error(tmp_path, make, message):
    with pytest.raises(DiffkitError, match=message) as info:
        first(make(tmp_path))
    assert "\n" not in str(info.value)
