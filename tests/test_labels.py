"""Per-token labels: the organism corpora's answer key, carried through collect into the store format.

Real collect runs (zoo models, tiny stores); the fuzz cases edit real label files and manifests.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffkit.activations import ActivationStore, CollectConfig, collect_activations
from diffkit.corpora import token_sequences
from diffkit.errors import DiffkitError
from diffkit.organisms import (LABELS, RELATION, RESPONSE, TRIGGER, cot_problems, cot_prompt, facts,
                               label_names)
from diffkit.store_format import MANIFEST, shard_files, write_manifest
from diffkit.io import sha256_file
from diffkit.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _collect(out, corpus: str, tokens: int = 4000):
    cfg = CollectConfig(model_a="zoo:base", model_b="zoo:finetuned", hook_a="blocks.1.hook_resid_post",
                        hook_b="blocks.1.hook_resid_post", corpus=corpus, tokens=tokens, shard_mb=0.25,
                        heldout_every=4)
    collect_activations(cfg, out, progress=False)
    return ActivationStore.open(out)


@pytest.fixture(scope="module")
def backdoor_store(tmp_path_factory):
    return _collect(tmp_path_factory.mktemp("labels") / "backdoor", "organism:backdoor", tokens=12000)


@pytest.fixture
def store_copy(backdoor_store, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(backdoor_store.root, dst)
    return dst


def _spans(labels: np.ndarray, ids: np.ndarray, value: int) -> list[str]:
    """Decoded text of each maximal run of ``value`` in ``labels``."""
    out, run = [], []
    for lab, tok in zip(labels, ids):
        if lab == value:
            run.append(tok)
        elif run:
            out.append(TOK.decode(np.array(run)))
            run = []
    if run:
        out.append(TOK.decode(np.array(run)))
    return out


# -- the corpora's markup ------------------------------------------------------------------------
def test_trigger_never_occurs_in_the_base_prose():
    from diffkit.corpora import documents

    assert not any(TRIGGER in d.text or RESPONSE.strip() in d.text for d in documents("prose"))


@pytest.mark.parametrize("corpus", ["organism:backdoor", "organism:facts@0.4", "organism:cot-steps", "organism:cot"])
def test_labels_mark_exactly_the_planted_text(corpus):
    seqs = [s for _, s in zip(range(400), token_sequences(corpus, TOK, 128, split="train"))]
    assert all(s.labels is not None and s.labels.shape == s.ids.shape for s in seqs)
    ids = np.concatenate([s.ids[1:s.length] for s in seqs])
    labels = np.concatenate([s.labels[1:s.length] for s in seqs])
    assert all(s.labels[0] == 0 and not s.labels[s.length:].any() for s in seqs)  # BOS, padding: ordinary
    if corpus == "organism:backdoor":
        trig, resp = _spans(labels, ids, 1), _spans(labels, ids, 2)
        assert len(trig) >= 5 and set(trig) == {TRIGGER} and set(resp) == {RESPONSE}
        assert TRIGGER not in TOK.decode(ids[labels == 0])
    elif corpus == "organism:facts@0.4":
        places = {f.name: f.place for f in facts()}
        names, rel, place = _spans(labels, ids, 1), _spans(labels, ids, 2), _spans(labels, ids, 3)
        assert len(names) == len(place) >= 50 and set(rel) == {RELATION}
        assert set(names) <= set(places) and len(set(names)) > 10
        assert all(places[n] == p.strip() for n, p in zip(names, place))  # each name with its own place
    else:
        prompts = [p + "=" for p in _spans(labels, ids, 1)]
        assert set(_spans(labels, ids, 2)) == {"="} and len(prompts) >= 100
        assert set(prompts) <= {cot_prompt(p) for p in cot_problems("train")}  # no held-out problem


def test_cot_models_see_the_same_problems_and_prose():
    steps = [s for _, s in zip(range(60), token_sequences("organism:cot-steps", TOK, 128, split="train"))]
    answer = [s for _, s in zip(range(60), token_sequences("organism:cot-answer", TOK, 128, split="train"))]
    for s, a in zip(steps, answer):
        prompts = [_spans(x.labels[:x.length], x.ids[:x.length], 1) for x in (s, a)]
        assert prompts[0] == prompts[1]
        if not s.labels.any():
            assert np.array_equal(s.ids, a.ids)  # the prose rows are identical


@pytest.mark.parametrize("name", ["backdoor", "facts", "cot", "code"])
def test_store_corpora_keep_the_planted_share_low(name):
    """A feature can only hold 20x the planted tokens' share of activation mass if that share is < 5%."""
    seqs = [s for _, s in zip(range(1500), token_sequences(f"organism:{name}", TOK, 128))]
    share = sum(int((s.labels > 0).sum()) for s in seqs) / sum(s.length - 1 for s in seqs)
    assert 0.003 < share < 0.04, share
    dense = [s for _, s in zip(range(1500), token_sequences(f"organism:{name}@0.5", TOK, 128))]
    assert sum(int((s.labels > 0).sum()) for s in dense) > 1.5 * sum(int((s.labels > 0).sum()) for s in seqs)


def test_unknown_organism_corpus_is_one_line_error():
    with pytest.raises(DiffkitError, match="organism:backdoor"):
        label_names("organism:nope")
    with pytest.raises(DiffkitError, match="unknown organism"):
        next(token_sequences("organism:nope", TOK, 128))
    assert label_names("prose") is None and label_names("organism:facts") == list(LABELS["facts"])
    for bad in ("organism:facts@2", "organism:facts@x", "organism:sae@0.1"):
        with pytest.raises(DiffkitError, match="RATE"):
            label_names(bad)


# -- the store -----------------------------------------------------------------------------------
def test_collected_store_has_labels_aligned_with_its_tokens(backdoor_store):
    st = backdoor_store
    assert st.has_labels and st.label_names == ["ordinary", "trigger", "response"]
    for split in ("train", "heldout", "all"):
        lab = st.labels(split)
        assert lab.shape == (st.n_tokens(split),) and lab.dtype == np.int64
        assert sum(len(a) for a, _ in st.iter_shards(split)) == len(lab)
        n_batched = sum(len(a) for a, _ in st.iter_batches(64, split=split, shuffle=False, drop_last=False))
        assert n_batched == len(lab)
    assert np.array_equal(st.labels("all"), np.concatenate([  # all = per shard, train rows then held-out rows
        st.labels("all")[:0]] + [np.asarray(np.load(st.root / shard_files(i, labels=True)["labels"]), np.int64)
                                 for i in range(st.n_shards)]))
    lab = st.labels("train")
    assert 0 < (lab == 1).sum() < 0.05 * len(lab) and (lab == 2).sum() > (lab == 1).sum()
    # Decode the token of every labelled row (in split order) and recover the planted strings.
    rows = np.arange(len(lab))
    toks = np.array([ids[off] for ids, off in st.contexts(rows, split="train", window=0)])
    trig = _spans(lab, toks, 1)
    assert trig and set(t for t in trig[:-1]) == {TRIGGER}  # the last may be cut by the token budget
    assert set(_spans(lab, toks, 2)[:-1]) <= {RESPONSE}
    assert TRIGGER not in TOK.decode(toks[lab == 0])


def test_store_without_labels_opens_and_says_so(tmp_path):
    st = _collect(tmp_path / "prose", "prose", tokens=600)
    assert not st.has_labels and st.label_names == [] and "labels" not in st.manifest
    assert not (tmp_path / "prose" / "labels").exists()
    with pytest.raises(DiffkitError, match="no per-token labels"):
        st.labels("train")


def test_store_info_shows_labels(backdoor_store):
    from click.testing import CliRunner

    from diffkit.cli import main

    res = CliRunner().invoke(main, ["store", "info", str(backdoor_store.root)])
    assert res.exit_code == 0, res.output
    assert "labels: 0 ordinary" in res.output and "1 trigger" in res.output and "2 response" in res.output


# -- fuzz: damaged label files and manifests fail at open (or at read) with one line -------------------
LABEL_REL = shard_files(0, labels=True)["labels"]


def _edit_manifest(root, fn):
    """Edit the manifest and reseal it, so that the field checks behind the seal are what is tested (an
    unsealed edit is refused by the seal itself: tests/test_io.py)."""
    path = root / MANIFEST
    m = json.loads(path.read_text())
    m.pop("json_sha256", None)
    fn(m)
    write_manifest(root, m)


def _rewrite_label_file(root, array):
    np.save(root / LABEL_REL, array)

    def fix(m):
        m["shards"][0]["files"][LABEL_REL].update(bytes=(root / LABEL_REL).stat().st_size,
                                                  sha256=sha256_file(root / LABEL_REL),
                                                  dtype=str(array.dtype), shape=list(array.shape))
    _edit_manifest(root, fix)


def test_truncated_label_file_fails_at_open(store_copy):
    path = store_copy / LABEL_REL
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DiffkitError, match="truncated or damaged"):
        ActivationStore.open(store_copy)


def test_flipped_label_byte_fails_full_verify(store_copy):
    path = store_copy / LABEL_REL
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    ActivationStore.open(store_copy)  # same size: the cheap check passes
    with pytest.raises(DiffkitError, match="sha256"):
        ActivationStore.open(store_copy, verify="full")


def test_missing_label_file_fails_at_open(store_copy):
    (store_copy / LABEL_REL).unlink()
    with pytest.raises(DiffkitError, match="is missing"):
        ActivationStore.open(store_copy)


@pytest.mark.parametrize("case,edit", [
    ("names not a list", lambda m: m["labels"].update(names="trigger")),
    ("names empty", lambda m: m["labels"].update(names=[])),
    ("names repeated", lambda m: m["labels"].update(names=["a", "a", "b"])),
    ("names not strings", lambda m: m["labels"].update(names=[0, 1, 2])),
    ("labels not an object", lambda m: m.update(labels=[1, 2])),
    ("labels without names", lambda m: m.update(labels={})),
    ("label record dropped", lambda m: m["shards"][0]["files"].pop(LABEL_REL)),
    ("label shape wrong", lambda m: m["shards"][0]["files"][LABEL_REL].update(shape=[3])),
    ("label dtype float", lambda m: m["shards"][0]["files"][LABEL_REL].update(dtype="float32")),
    ("labels entry dropped, files left", lambda m: m.pop("labels")),
])
def test_malformed_label_manifest_fails_at_open(store_copy, case, edit):
    _edit_manifest(store_copy, edit)
    with pytest.raises(DiffkitError, match="malformed"):
        ActivationStore.open(store_copy)


def test_label_file_with_wrong_header_fails_at_read(store_copy):
    st = ActivationStore.open(store_copy)
    n = st.manifest["shards"][0]["n_tokens"]
    np.save(store_copy / LABEL_REL, np.zeros(n, np.int16))  # same rows, another dtype than the manifest's
    _edit_manifest(store_copy, lambda m: m["shards"][0]["files"][LABEL_REL].update(
        bytes=(store_copy / LABEL_REL).stat().st_size))
    with pytest.raises(DiffkitError, match="the manifest says"):
        ActivationStore.open(store_copy).labels("all")


def test_label_values_without_names_fail_at_read(store_copy):
    n = ActivationStore.open(store_copy).manifest["shards"][0]["n_tokens"]
    _rewrite_label_file(store_copy, np.full(n, 9, np.uint8))
    st = ActivationStore.open(store_copy, verify="full")
    with pytest.raises(DiffkitError, match="outside 0..2"):
        st.labels("train")


def test_int16_labels_are_accepted(store_copy):
    st = ActivationStore.open(store_copy)
    want = st.labels("all")[:st.manifest["shards"][0]["n_tokens"]]
    _rewrite_label_file(store_copy, want.astype(np.int16))
    assert np.array_equal(ActivationStore.open(store_copy, verify="full").labels("all")[:len(want)], want)


def test_resume_keeps_labels(tmp_path):
    cfg = CollectConfig(model_a="zoo:base", model_b="zoo:base", hook_a="blocks.1.hook_resid_post",
                        hook_b="blocks.1.hook_resid_post", corpus="organism:facts@0.4", tokens=3000, shard_mb=0.1)
    full = tmp_path / "full"
    collect_activations(cfg, full, progress=False)
    part = tmp_path / "part"
    collect_activations(cfg, part, progress=False)
    m = json.loads((part / MANIFEST).read_text())  # pretend the run died after its first shard
    for rel in [r for s in m["shards"][1:] for r in s["files"]]:
        (part / rel).unlink()
    m["shards"], m["complete"] = m["shards"][:1], False
    m.pop("json_sha256")
    write_manifest(part, m)  # sealed, as collect writes it after each shard
    collect_activations(cfg, part, resume=True, progress=False)
    a, b = ActivationStore.open(full), ActivationStore.open(part, verify="full")
    assert np.array_equal(a.labels("all"), b.labels("all")) and (a.labels("all") > 0).any()
