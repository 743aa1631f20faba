"""Crosscoder model: losses, the sparse BatchTopK path, aux gradient, folding, save/load (no store needed)."""

from __future__ import annotations

import json

import pytest
import torch

from baselines.crosscoder import load
from baselines.crosscoder.metrics import FveAccumulator, fve, fvu
from baselines.crosscoder.model import CFG_FILE, CrossCoder, CrossCoderConfig, crosscoder_loss, fold_normalization, save
from baselines.crosscoder.model_util import global_topk_threshold
from diffkit.errors import DiffkitError
from diffkit.io import write_sealed_json


def _model(arch="batchtopk", d_in=(8, 12), L=64, k=4, scale=(2.0, 0.5), seed=0):
    return CrossCoder(CrossCoderConfig(d_in=d_in, dict_size=L, arch=arch, k=k, scale=scale), seed=seed)


def test_fvu_is_zero_for_perfect_and_one_for_the_mean():
    x = torch.randn(100, 7) * 3 + 1
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0, abs=1e-12)
    assert fve(x, x) == 1.0
    acc = FveAccumulator((3, 4))
    for chunk in torch.split(x, 30):
        acc.update([chunk[:, :3], chunk[:, 3:]], [chunk[:, :3], x[:, 3:].mean(0).expand(len(chunk), 4)])
    assert acc.fve()[0] == pytest.approx(1.0) and acc.fve()[1] == pytest.approx(0.0, abs=1e-9)


def test_global_topk_is_topk_in_one_process():
    s = torch.rand(1000)
    vals, idx = global_topk_threshold(s, 37)
    assert set(idx.tolist()) == set(torch.topk(s, 37).indices.tolist())


def test_l1_loss_is_the_stated_formula():
    m = _model("l1")
    x = torch.randn(16, 20)
    out = m(x)
    parts = crosscoder_loss(m, x, out, l1=0.3)
    n_L = m.W_dec_LD[:, :8].norm(dim=1) + m.W_dec_LD[:, 8:].norm(dim=1)
    expected = ((x - out.x_hat_BD) ** 2).sum(1).mean() + 0.3 * (out.f_BL * n_L).sum(1).mean()
    assert torch.allclose(parts.loss, expected)


def test_batchtopk_keeps_k_times_batch_and_sparse_path_matches_dense():
    torch.manual_seed(0)
    x = torch.randn(32, 20) * 3
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    grads = []
    for sparse in (False, True):
        m = _model()
        out = m(x, sparse=sparse)
        if not sparse:
            assert int((out.f_BL > 0).sum()) == 4 * 32  # exactly k·B active over the batch
        loss = crosscoder_loss(m, x, out, dead_L=dead)
        loss.loss.backward()
        grads.append((loss.loss.detach(), out.x_hat_BD.detach(), [p.grad.clone() for p in m.parameters()]))
    (l0, xh0, g0), (l1, xh1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-5) and torch.allclose(xh0, xh1, atol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-5)


def test_aux_loss_gradient_reaches_dead_latents_and_moves_them():
    torch.manual_seed(1)
    m = _model(L=64, k=2)
    x = torch.randn(32, 20) * 3
    out = m(x, sparse=True)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[out.active[1]] = True
    dead = ~fired  # latents that did not fire in this batch
    assert dead.sum() > 10
    # Without the aux loss the dead latents get no gradient at all (the known bug's symptom)...
    crosscoder_loss(m, x, out, dead_L=None).loss.backward()
    assert m.W_dec_LD.grad[dead].abs().sum() == 0 and m.W_enc_LD.grad[dead].abs().sum() == 0
    # ...with it, their encoder and decoder rows receive gradient and an Adam step moves them.
    m.zero_grad()
    out = m(x, sparse=True)
    parts = crosscoder_loss(m, x, out, dead_L=dead)
    assert parts.aux > 0
    parts.loss.backward()
    got = (m.W_dec_LD.grad[dead].abs().sum(1) > 0) & (m.W_enc_LD.grad[dead].abs().sum(1) > 0)
    assert got.float().mean() > 0.5
    before = m.W_dec_LD.detach()[dead].clone()
    torch.optim.Adam(m.parameters(), lr=1e-3).step()
    assert (m.W_dec_LD.detach()[dead] - before).abs().sum(1).gt(0).float().mean() > 0.5


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_folding_the_normalization_leaves_outputs_unchanged(arch):
    m = _model(arch)
    with torch.no_grad():
        m.b_dec_D.normal_()
        m.b_enc_L.normal_(std=0.1)
        m.threshold.fill_(0.02)
    xs = [torch.randn(50, 8) * 4, torch.randn(50, 12) * 0.3]
    folded = fold_normalization(m)
    assert folded.cfg.folded and not m.cfg.folded
    f0, f1 = m.encode(xs), folded.encode(xs)
    assert torch.allclose(f0, f1, atol=1e-5) and (f0 > 0).sum() > 0
    for a, b in zip(m.reconstruct(xs), folded.reconstruct(xs)):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(m.dec_norms_LM(), folded.dec_norms_LM(), atol=1e-6)
    # raw in, raw out: the unfolded model multiplies by the scale on the way in and divides on the way out
    x_BD = torch.cat([xs[0] * 2.0, xs[1] * 0.5], dim=1)
    x_hat = m(x_BD, train=False).x_hat_BD
    assert torch.allclose(m.reconstruct(xs)[0], x_hat[:, :8] / 2.0, atol=1e-5)


def test_save_load_roundtrip_and_strict_config(tmp_path):
    m = fold_normalization(_model())
    save(m, tmp_path / "cc")
    back = load(tmp_path / "cc")
    xs = [torch.randn(5, 8), torch.randn(5, 12)]
    assert torch.equal(m.encode(xs), back.encode(xs)) and back.cfg == m.cfg
    raw = json.loads((tmp_path / "cc" / CFG_FILE).read_text())
    (tmp_path / "cc" / CFG_FILE).write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(DiffkitError, match="fails its json_sha256 checksum"):  # an edit leaves the seal stale
        load(tmp_path / "cc")
    write_sealed_json(tmp_path / "cc" / CFG_FILE, {**raw, "surprise": 1})  # sealed: the strict config check fires
    with pytest.raises(DiffkitError, match="unknown keys \\['surprise'\\]"):
        load(tmp_path / "cc")
    with pytest.raises(DiffkitError, match="not a crosscoder"):
        load(tmp_path)


def test_bad_configs_are_refused():
    with pytest.raises(DiffkitError, match="dict-size must be positive"):
        CrossCoderConfig(d_in=(4, 4), dict_size=0)
    with pytest.raises(DiffkitError, match="--k 65 must be between 1 and --dict-size 64"):
        CrossCoderConfig(d_in=(4, 4), dict_size=64, k=65)
    with pytest.raises(DiffkitError, match="arch"):
        CrossCoderConfig(d_in=(4, 4), dict_size=64, arch="jumprelu")


def test_two_stage_batchtopk_selection_is_exact_even_when_winners_crowd_into_few_rows():
    from baselines.crosscoder.sparse import select_batchtopk

    torch.manual_seed(3)
    for crowd in (1.0, 50.0):
        score = torch.randn(64, 500).relu()
        score[:3] *= crowd  # a few outlier tokens hold most of the batch's top entries
        rows, cols, vals = select_batchtopk(score, n_keep=64 * 4, per_row=16)
        top = torch.topk(score.flatten(), 64 * 4)
        expected = {(int(i) // 500, int(i) % 500) for i, v in zip(top.indices, top.values) if v > 0}
        assert set(zip(rows.tolist(), cols.tolist())) == expected
        assert torch.equal(vals, score[rows, cols])
        assert (torch.diff(rows * 500 + cols) > 0).all()  # CSR order


def test_training_step_runs_under_bf16_autocast_with_float32_sparse_products():
    """The first GPU run failed here: under bf16 autocast the selection score is bf16, and the sparse
    products (CUDA sampled_addmm, MKL CSR) reject it. CPU autocast reproduces the same failure."""
    from baselines.crosscoder.train import TrainConfig, _Step

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(256, dtype=torch.bool)
    dead[:128] = True  # the aux loss (sparse products too) runs
    grads = {}
    for sparse in (True, False):
        for autocast in (False, True):
            m = CrossCoder(CrossCoderConfig(d_in=(16, 16), dict_size=256, k=4), seed=0)
            step = _Step(m, TrainConfig(acts="", out="", sparse=sparse, dict_size=256, k=4))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = step(x, torch.tensor(0.0), dead)[0]
            loss.backward()
            assert torch.isfinite(loss) and m.W_dec_LD.grad.dtype == torch.float32
            grads[sparse, autocast] = m.W_dec_LD.grad
    for sparse in (True, False):  # bf16 changes the numbers a little, not the gradient's direction
        cos = torch.nn.functional.cosine_similarity(grads[sparse, False].flatten(), grads[sparse, True].flatten(), dim=0)
        assert cos > 0.95, (sparse, float(cos))


def test_prefetched_batches_keep_their_order_and_raise_the_workers_error():
    import numpy as np

    from baselines.crosscoder.prefetch import prefetched

    batches = [(np.full((4, 2), i, np.float32), np.zeros((4, 3), np.float32)) for i in range(7)]
    for threaded in (False, True):
        got = list(prefetched(iter(batches), torch.device("cpu"), depth=2, threaded=threaded))
        assert [float(x[0, 0]) for x in got] == list(range(7)) and got[0].shape == (4, 5)

    def failing():
        yield batches[0]
        raise ValueError("truncated shard")

    with pytest.raises(ValueError, match="truncated shard"):
        list(prefetched(failing(), torch.device("cpu"), threaded=True))
    it = prefetched(iter(batches), torch.device("cpu"), depth=1, threaded=True)
    assert float(next(it)[0, 0]) == 0.0
    it.close()  # a consumer that stops early (the run reached its steps) ends the worker
