"""Scale: the streaming planted generator is the in-memory one, the scale benchmark runs end to end,
and reading batches from a bigger store costs no more memory."""

import hashlib
import json
import tracemalloc

import numpy as np
import pytest

from diffkit.activations import ActivationStore
from diffkit.errors import DiffkitError
from diffkit.synthetic import PlantedConfig, PlantedStream, make_planted, write_planted_store

FIELDS = ("dict_a", "dict_b", "shared_a", "shared_b", "a_only", "b_only", "map_ab", "codes_a", "codes_b", "acts_a",
          "acts_b", "mean_a", "mean_b", "changed_a", "changed_b")
BLAS_FIELDS = ("acts_a", "acts_b")  # codes @ dict: the last bits depend on the BLAS kernel (OPENBLAS_CORETYPE)


def _digest(pair, fields=FIELDS) -> str:
    h = hashlib.sha256()
    for name in fields:
        a = getattr(pair, name)
        h.update(name.encode()), h.update(str(a.dtype).encode()), h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _act_moments(pair) -> list[float]:
    out = []
    for name in BLAS_FIELDS:
        x = getattr(pair, name).astype(np.float64)
        w = np.cos(np.arange(x.shape[1]) * 1.3)
        out += [float(x.sum()), float((x * x).sum()), float((x @ w).sum()), float(np.abs(x).max())]
    return out


def test_make_planted_is_byte_identical_to_the_generator_before_streaming():
    """Existing seeds give the same pairs as the pre-streaming make_planted (commit da7f4aa, whose digest over
    every field this code reproduces under OPENBLAS_CORETYPE=SkylakeX: e6da51a4... and 4d4d6a73...).

    Everything the generator draws is pinned byte for byte; the activations, a float32 matmul of the pinned
    codes and dictionary, differ in their last bits between BLAS kernels (Haswell vs SkylakeX here), so
    they are pinned by float64 moments to 1e-6 instead of by bytes."""
    exact = [f for f in FIELDS if f not in BLAS_FIELDS]
    cases = [
        (PlantedConfig(n_tokens=2000), "8e79b93d3c0c43e7213a8c59c14c818170390c2d3b1c79d44ae79ffe59ea13b3",
         [-326.557888, 10521.4394, -1905.9532, 1.6048075, 1271.19628, 10535.6029, -1026.60587, 1.72794843]),
        (PlantedConfig(d_a=40, d_b=24, n_shared=64, n_a_only=0, n_b_only=12, k=3, n_tokens=1000, noise=0.3, seed=5,
                       n_changed=7), "f370b9d5f25678cb93af0c4b0a9869464cea9880b9a6d667080bd00208c6b622",
         [-403.808395, 4443.69627, 407.650585, 1.77754545, 1111.41316, 4059.8046, 372.309295, 1.91172683]),
    ]
    for cfg, digest, moments in cases:
        pair = make_planted(cfg)
        assert _digest(pair, exact) == digest
        assert np.allclose(_act_moments(pair), moments, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cfg", [
    PlantedConfig(d_a=40, d_b=24, n_shared=64, n_a_only=5, n_b_only=12, k=3, n_tokens=1000, noise=0.3, seed=5,
                  n_changed=7, scale_b=2.0),
    PlantedConfig(d_a=16, d_b=16, n_shared=48, n_a_only=0, n_b_only=4, k=6, n_tokens=777, seed=2),
])
def test_streamed_chunks_equal_the_in_memory_pair(cfg):
    pair = make_planted(cfg)
    stream = PlantedStream(cfg)
    for name in ("dict_a", "dict_b", "shared_a", "shared_b", "a_only", "b_only", "changed_a", "changed_b", "map_ab",
                 "mean_a", "mean_b"):
        np.testing.assert_array_equal(getattr(stream, name), getattr(pair, name))
    np.testing.assert_array_equal(stream.match_a_to_b, pair.match_a_to_b)
    for sparse in (False, True):
        chunks = list(stream.chunks(96, sparse=sparse, with_codes=True))
        assert [c.t0 for c in chunks] == list(range(0, cfg.n_tokens, 96))
        cat = {k: np.concatenate([getattr(c, k) for c in chunks]) for k in ("ids", "codes_a", "codes_b", "acts_a",
                                                                            "acts_b")}
        np.testing.assert_array_equal(cat["codes_a"], pair.codes_a)  # the same random numbers, bit for bit
        np.testing.assert_array_equal(cat["codes_b"], pair.codes_b)
        np.testing.assert_array_equal(cat["ids"], np.where(pair.codes_a.max(1) > 0, 97 + pair.codes_a.argmax(1) % 26,
                                                           32))
        # The codes are the same random numbers bit for bit (above); the activations are float32 products of
        # them, and a BLAS sums a 96-row chunk in another order than the whole matrix when it runs on more
        # than one thread (CI's 2 cores; equal at 1 thread): float32 rounding only, so compare at that level.
        np.testing.assert_allclose(cat["acts_a"], pair.acts_a, rtol=0, atol=1e-5)
        np.testing.assert_allclose(cat["acts_b"], pair.acts_b, rtol=0, atol=1e-5 * cfg.scale_b)
    # Any range on its own, out of order, is the same rows.
    a, b = stream.codes(500, 613)
    np.testing.assert_array_equal(a, pair.codes_a[500:613])
    np.testing.assert_array_equal(b, pair.codes_b[500:613])
    with pytest.raises(DiffkitError, match="outside"):
        stream.codes(0, cfg.n_tokens + 1)


def test_a_streamed_store_holds_the_in_memory_rows(tmp_path):
    cfg = PlantedConfig(d_a=16, d_b=24, n_shared=32, n_a_only=4, n_b_only=4, k=2, n_tokens=5000, ctx=50, seed=1,
                        noise=0.1)
    write_planted_store(make_planted(cfg), tmp_path / "mem", seqs_per_shard=16)
    write_planted_store(PlantedStream(cfg), tmp_path / "stream", seqs_per_shard=16)
    mem, streamed = ActivationStore.open(tmp_path / "mem"), ActivationStore.open(tmp_path / "stream", verify="full")
    assert streamed.n_shards == mem.n_shards == 7 and streamed.n_tokens("heldout") == mem.n_tokens("heldout")
    for split in ("train", "heldout"):
        for (a1, b1), (a2, b2) in zip(mem.iter_shards(split, normalized=False),
                                      streamed.iter_shards(split, normalized=False)):
            np.testing.assert_allclose(a2.numpy(), a1.numpy(), atol=1e-5)
            np.testing.assert_allclose(b2.numpy(), b1.numpy(), atol=1e-5)
    for s1, s2 in zip(mem.manifest["shards"], streamed.manifest["shards"]):
        assert {k: s1[k] for k in ("seq_start", "n_seqs", "n_train")} == {k: s2[k] for k in ("seq_start", "n_seqs",
                                                                                           "n_train")}
        ids = [rel for rel in s1["files"] if rel.endswith(".ids.npy")]
        assert s1["files"][ids[0]]["sha256"] == s2["files"][ids[0]]["sha256"]  # same fake tokens
    assert abs(streamed.scale("a") - mem.scale("a")) < 1e-6 * mem.scale("a")


def _peak_traced_bytes(store: ActivationStore, batch: int, n_batches: int) -> int:
    next(iter(store.iter_batches(batch, split="train", seed=99)))  # imports and first-use caches are not the reads
    tracemalloc.start()
    try:
        for i, (a, b) in enumerate(store.iter_batches(batch, split="train", seed=3)):
            assert a.shape == (batch, store.d_model("a"))
            del a, b
            if i + 1 == n_batches:
                break
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_batches_from_a_bigger_store_allocates_no_more(tmp_path):
    from diffkit.activations import MAX_OPEN_MAPS
    from diffkit.bench.scale import tile_store

    cfg = PlantedConfig(d_a=64, d_b=48, n_shared=96, n_a_only=8, n_b_only=8, k=4, n_tokens=16_384, ctx=64, seed=4)
    write_planted_store(PlantedStream(cfg), tmp_path / "small", seqs_per_shard=8)  # 32 shards of 512 tokens
    tile_store(tmp_path / "small", tmp_path / "big", repeats=12)                    # 384 shards
    small, big = ActivationStore.open(tmp_path / "small"), ActivationStore.open(tmp_path / "big", verify="full")
    assert big.n_tokens("all") == 12 * small.n_tokens("all") and big.n_shards == 384
    a_small, _ = small.batch(np.arange(100))
    a_big, _ = big.batch(np.arange(100) + 5 * small.n_tokens("train"))  # copy 5 holds the same rows
    np.testing.assert_array_equal(a_small.numpy(), a_big.numpy())
    batch = 1024
    row_bytes = 4 * (small.d_model("a") + small.d_model("b"))
    n_batches = 40  # 40k rows: ~10 windows of 8 shards, more than the small store's 14.7k train rows per epoch...
    peak_small = _peak_traced_bytes(small, batch, small.n_tokens("train") // batch)
    peak_big = _peak_traced_bytes(big, batch, n_batches)
    # ...yet the bigger store's reads hold no more than the smaller's: index arrays for one window and a batch or two.
    assert peak_big <= 1.25 * peak_small + 512 * 1024, (peak_big, peak_small)  # + up to 256 open-map objects
    window_index_bytes = 2 * 8 * 8 * 512 * 8 * 2  # (shard, row) int64 for one window, with a permutation copy
    assert peak_big < 4 * batch * row_bytes + 2 * window_index_bytes, peak_big
    # The memory maps it keeps open are bounded too (each holds a file descriptor and its resident pages).
    assert len(big._arrays) <= MAX_OPEN_MAPS
    # The whole big store read in batches: still the same bound (what grows is only the shard order, 8 bytes/shard).
    full_peak = _peak_traced_bytes(big, batch, big.n_tokens("train") // batch)
    assert full_peak <= 1.25 * peak_small + 512 * 1024, (full_peak, peak_small)


def test_a_tiny_scale_run_writes_the_report_with_its_rows(tmp_path):
    from diffkit.bench.scale import run_scale_benchmark
    from diffkit.bench.scale_report import write_scale_report

    logged = []
    result, rows = run_scale_benchmark("tiny", tmp_path / "work", threads=1, log=logged.append,
                                       command="diffkit bench scale --tiny-test")
    assert list((tmp_path / "work").iterdir()) == [] or all(not any(p.iterdir()) for p in (tmp_path / "work").iterdir())
    cases = [r.case for r in rows]
    assert cases == ["align assignment stage, 512 features, d 64",
                     "diffkit align end to end, 512 features, d 64, 768 tokens",
                     "align recovers the planted answer, 512 features, d 64",
                     *[f"crosscoder 1,024 latents, d 32+32, store {result.crosscoder[1].store_bytes / 2**30:.1f} GiB vs "
                       f"{result.crosscoder[0].store_bytes / 2**30:.1f} GiB: {what}"
                       for what in ("peak RSS (VmHWM)", "peak anonymous memory (RssAnon, sampled)", "training rate")]]
    (a,) = result.align
    assert a.shared_recovered == 1.0 and a.a_only_found == 1.0 and a.b_only_found == 1.0 and a.shared_lost == 0.0
    assert a.counts == {"shared": 461, "a_only": 51, "b_only": 51}  # 90% of 512 shared (planted_config rounding)
    assert abs(a.total_cost - a.dense_total_cost) < 1e-3  # the sparse solver finds scipy's optimum
    assert rows[0].baseline_figure == a.dense_seconds and rows[0].peak_rss_bytes == a.peak_rss_bytes > 0
    small, big = result.crosscoder
    assert big.store_tokens == 3 * small.store_tokens and big.shards == 3 * small.shards
    assert small.steps == big.steps == 4
    assert 0.8 < rows[3].ratio < 1.25  # VmHWM does not follow the store's size (3×)
    assert all(r.unit in ("s", "fraction", "GiB", "tokens/s") and r.device == "cpu" for r in rows)
    md, js = write_scale_report(result, rows, tmp_path / "reports" / "scale.md")
    text = md.read_text()
    assert text.startswith("<!-- Generated by: diffkit bench scale --tiny-test -->")
    assert "| 512 | 64 | 768 |" in text and "100.00%" in text and "same optimum" in text
    data = json.loads(js.read_text())
    assert data["command"] == "diffkit bench scale --tiny-test" and len(data["rows"]) == len(rows)
    assert any("align 512 features" in line for line in logged)
    from diffkit.bench.scale_report import format_scale_report, load_scale_json

    assert format_scale_report(*load_scale_json(js)) == text  # the JSON holds everything the report shows
