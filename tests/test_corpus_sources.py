"""Corpora you have: jsonl files, globs, Hugging Face datasets (local folders; the hub offline)."""

import json

import pytest
from click.testing import CliRunner

from diffkit.cli import main
from diffkit.corpora import documents, token_sequences
from diffkit.errors import DiffkitError
from diffkit.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _texts(corpus, split="all"):
    return sorted(d.text for d in documents(corpus, split))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")  # a trailing blank line is fine
    return path


def test_jsonl_file_and_named_field(tmp_path):
    f = _jsonl(tmp_path / "notes.jsonl", [{"text": "alpha one", "body": "A"}, {"text": "beta two", "body": "B"}])
    assert _texts(str(f)) == ["alpha one", "beta two"]
    assert _texts(f"{f}#body") == ["A", "B"]
    assert [d.name for d in documents(str(f))] == ["notes.jsonl:1", "notes.jsonl:2"]


def test_glob_of_text_and_jsonl_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("plain text file")
    (tmp_path / "d" / "sub" / "b.txt").write_text("nested text file")
    _jsonl(tmp_path / "d" / "sub" / "c.jsonl", [{"text": "record %d" % i} for i in range(3)])
    (tmp_path / "d" / "skip.bin").write_bytes(b"\xff\xfe")
    assert _texts(str(tmp_path / "d" / "**" / "*.txt")) == ["nested text file", "plain text file"]
    docs = documents(str(tmp_path / "d" / "**" / "*.jsonl"))
    assert [d.name for d in docs] == ["sub/c.jsonl:1", "sub/c.jsonl:2", "sub/c.jsonl:3"]  # relative to the glob's root
    # the document-level split holds for these corpora too: disjoint, and together everything
    docs = [{"text": f"document number {i}"} for i in range(300)]
    pattern = str(_jsonl(tmp_path / "many.jsonl", docs).parent / "many.*")
    train, held = _texts(pattern, "train"), _texts(pattern, "heldout")
    assert not set(train) & set(held) and len(train) + len(held) == 300 and 10 < len(held) < 60
    seqs = list(token_sequences(pattern, TOK, 16, split="train"))
    assert seqs and all(s.ids[0] == TOK.bos_id for s in seqs)


def test_local_datasets_offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    rows = {"text": ["the first row", "the second row"], "label": [0, 1]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({"text": ["a test row"], "label": [2]})}
                         ).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "folder").mkdir()
    _jsonl(tmp_path / "folder" / "part.jsonl", [{"content": "from a data folder"}])
    assert _texts(str(tmp_path / "saved")) == ["the first row", "the second row"]  # no prefix needed
    assert _texts(f"hf:{tmp_path / 'saved'}") == ["the first row", "the second row"]
    assert _texts(f"hf:{tmp_path / 'saved_dict'}@test") == ["a test row"]
    assert _texts(f"hf:{tmp_path / 'saved_dict'}") == ["the first row", "the second row"]  # train by default
    assert _texts(f"hf:{tmp_path / 'folder'}#content") == ["from a data folder"]
    with pytest.raises(DiffkitError, match="has no column 'text' .*content"):
        documents(f"hf:{tmp_path / 'folder'}")
    with pytest.raises(DiffkitError, match="no split 'validation' .*train, test"):
        documents(f"hf:{tmp_path / 'saved_dict'}@validation")


def test_unreachable_hub_is_one_line(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # as the hub being unreachable, without waiting
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DiffkitError) as info:
        documents("hf:nobody/no-such-dataset@train[:100]")
    msg = str(info.value)
    assert "\n" not in msg and "'nobody/no-such-dataset' on the Hugging Face hub" in msg and "offline" in msg


@pytest.mark.parametrize("make,message", [
    (lambda p: str(p / "none" / "*.txt"), "matches no files"),
    (lambda p: str(_jsonl(p / "x.jsonl", [{"body": "no text"}])), "has no text field 'text' (it has body)"),
    (lambda p: str(_jsonl(p / "x.jsonl", [{"text": 3}])), "holds int, not text"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "ok"}\n{oops\n') and str(p / "x.jsonl"), "x.jsonl:2 is not a JSON"),
    (lambda p: (p / "t.txt").write_text("hi") and f"{p / 't.txt'}#body", "#FIELD applies to"),
    (lambda p: (p / "b.txt").write_bytes(b"\xff\xfe\x00") and str(p / "*.txt"), "is not UTF-8 text"),
])
def test_bad_sources_are_one_line_errors(tmp_path, make, message):
    corpus = make(tmp_path)
    res = CliRunner().invoke(main, ["collect", "--model-a", "zoo:base", "--model-b", "zoo:base", "--hook",
                                    "blocks.0.hook_resid_post", "--corpus", corpus, "--tokens", "100", "--out",
                                    str(tmp_path / "store"), "--quiet", "--device", "cpu"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_collect_from_a_jsonl_glob(tmp_path):
    from diffkit.activations import ActivationStore

    (tmp_path / "data").mkdir()
    for i in range(3):
        _jsonl(tmp_path / "data" / f"shard{i}.jsonl", [{"text": f"record {i}.{j}: " + "lorem ipsum " * 20}
                                                       for j in range(10)])
    res = CliRunner().invoke(main, ["collect", "--model-a", "zoo:base", "--model-b", "zoo:finetuned", "--hook",
                                    "blocks.0.hook_resid_post", "--corpus", str(tmp_path / "data" / "*.jsonl"),
                                    "--tokens", "3000", "--out", str(tmp_path / "store"), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    st = ActivationStore.open(tmp_path / "store")
    assert st.n_tokens("all") == 3000
    text = ByteTokenizer().decode(st.contexts([0], split="all", window=64)[0][0])
    assert "lorem ipsum" in text or "record" in text
