"""The sparse BatchTopK path: only the kept (token, latent) pairs cost anything after selection.

With ``N = k·B`` kept pairs out of ``B·L``, the dense autograd graph spends ``B·L·D`` multiply-adds
on each of: decoder forward, decoder input-gradient, decoder weight-gradient and encoder
weight-gradient. Here each is a sparse CSR product of ``N·D`` work (MKL's spmm and
``sampled_addmm``); only the encoder forward (needed to choose the code) stays dense, and it
runs without a graph. Selection is a per-row top ``4k`` then a global top ``k·B`` of the
candidates, exact: rows whose candidates might not hold all of their winners offer their whole row
in a second round (under DDP all ranks take part in it).

Shape letters as in :mod:`.model`; ``N``: kept pairs, sorted by (row, latent) so that the same
index order is the CSR order of every product.

Precision: the sparse products always run in float32, outside autocast. Under bf16 autocast
(the CUDA default) the selection score comes out in bf16, and neither CUDA's ``sampled_addmm``
(mixed dtypes) nor MKL's CSR product (no bf16 kernel) accepts it; the first GPU run of this code
failed exactly there. The products are O(N·D), so float32 costs little; the dense encoder score,
where bf16 pays, stays under autocast.
"""

from __future__ import annotations

import warnings

import torch

from .model_util import all_reduce, global_topk_threshold


def sort_pairs(rows_N: torch.Tensor, cols_N: torch.Tensor, L: int) -> torch.Tensor:
    """Permutation putting the pairs in CSR order (row-major, latents ascending within a row)."""
    # stable=True: torch 2.13's default (unstable) CPU argsort took 184 ms for 131k int64 keys, this 1 ms
    return torch.sort(rows_N * L + cols_N, stable=True).indices


def csr(rows_N: torch.Tensor, cols_N: torch.Tensor, vals_N: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR matrix from pairs already in CSR order (see :func:`sort_pairs`)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows_N.device)
    crow[1:] = torch.cumsum(torch.bincount(rows_N, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": the ops used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols_N, vals_N, shape, check_invariants=False)


def csr_t(rows_N: torch.Tensor, cols_N: torch.Tensor, vals_N: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The transpose (``shape[1] × shape[0]``) of the matrix with these pairs, as CSR."""
    order = sort_pairs(cols_N, rows_N, shape[0])
    return csr(cols_N[order], rows_N[order], vals_N[order], (shape[1], shape[0]))


class EncodeAt(torch.autograd.Function):
    """``pre_N = x[rows_N] · W_enc[cols_N] + b_enc[cols_N]`` given precomputed values; the backward
    is ``∂W_enc = Sᵀ x`` (S: the ``B × L`` sparse matrix of incoming gradients) and ``∂b_enc``."""

    @staticmethod
    def forward(ctx, pre_N, x_BD, W_enc_LD, b_enc_L, rows_N, cols_N):
        ctx.save_for_backward(x_BD, rows_N, cols_N)
        ctx.L = W_enc_LD.shape[0]
        return pre_N.to(torch.float32, copy=True)  # float32 from here on (see the module docstring)

    @staticmethod
    def backward(ctx, g_N):
        x_BD, rows_N, cols_N = ctx.saved_tensors
        S_T = csr_t(rows_N, cols_N, g_N.to(x_BD.dtype).contiguous(), (x_BD.shape[0], ctx.L))
        grad_W = S_T @ x_BD
        grad_b = torch.zeros(ctx.L, dtype=g_N.dtype, device=g_N.device).index_add_(0, cols_N, g_N)
        return None, None, grad_W, grad_b, None, None


class DecodeAt(torch.autograd.Function):
    """``x̂_BD = S W_dec`` with ``S[rows_N, cols_N] = vals_N``; backward ``∂vals = (g W_decᵀ)`` sampled
    at the pairs (``sampled_addmm``) and ``∂W_dec = Sᵀ g``."""

    @staticmethod
    def forward(ctx, vals_N, W_dec_LD, rows_N, cols_N, B):
        vals_N = vals_N.to(W_dec_LD.dtype)  # float32 (see the module docstring)
        with torch.autocast(device_type=W_dec_LD.device.type, enabled=False):
            S = csr(rows_N, cols_N, vals_N, (B, W_dec_LD.shape[0]))
            out = S @ W_dec_LD
        ctx.save_for_backward(vals_N, W_dec_LD, rows_N, cols_N)
        ctx.B = B
        return out

    @staticmethod
    def backward(ctx, g_BD):
        vals_N, W_dec_LD, rows_N, cols_N = ctx.saved_tensors
        g_BD = g_BD.to(W_dec_LD.dtype).contiguous()
        L = W_dec_LD.shape[0]
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            pattern = csr(rows_N, cols_N, torch.zeros_like(vals_N), (ctx.B, L))
            grad_vals = torch.sparse.sampled_addmm(pattern, g_BD, W_dec_LD.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_W = csr_t(rows_N, cols_N, vals_N, (ctx.B, L)) @ g_BD
        return grad_vals, grad_W, None, None, None


@torch.no_grad()
def select_batchtopk(score_BL: torch.Tensor, n_keep: int, per_row: int) -> tuple[torch.Tensor, ...]:
    """(rows_N, cols_N, score_N) of the positive scores among the global top ``n_keep``, CSR order."""
    B, L = score_BL.shape
    c = min(per_row, L)
    cand_v, cand_i = torch.topk(score_BL, c, dim=1, sorted=False)
    vals, idx = global_topk_threshold(cand_v.flatten(), n_keep)
    thr = vals.min() if vals.numel() else score_BL.new_tensor(float("inf"))
    thr = all_reduce(thr, "min")
    # A row whose c-th candidate reaches the threshold may hold more winners than it offered: those
    # rows (the tokens BatchTopK concentrates on) offer their whole row in a second round. Adding
    # candidates can only raise the threshold, so rows that passed the check still pass: exact.
    over = cand_v.min(dim=1).values >= thr
    if c < L and bool(all_reduce(over.any().to(torch.int32), "max")):
        ok_rows, over_rows = torch.nonzero(~over).flatten(), torch.nonzero(over).flatten()
        all_v = torch.cat([cand_v[ok_rows].flatten(), score_BL[over_rows].flatten()])
        all_r = torch.cat([ok_rows.repeat_interleave(c), over_rows.repeat_interleave(L)])
        all_c = torch.cat([cand_i[ok_rows].flatten(), torch.arange(L, device=score_BL.device).repeat(len(over_rows))])
        vals, idx = global_topk_threshold(all_v, n_keep)
        rows, cols = all_r[idx], all_c[idx]
    else:
        rows, cols = idx // c, cand_i.flatten()[idx]
    pos = vals > 0
    rows, cols, vals = rows[pos], cols[pos], vals[pos]
    order = sort_pairs(rows, cols, L)
    return rows[order], cols[order], vals[order]


@torch.no_grad()
def select_rowtopk(pre_BK: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows_N, cols_N, pre_N) of each row's ``k`` largest positive entries, CSR order (cols index K)."""
    B, K = pre_BK.shape
    vals, cols = torch.topk(pre_BK, min(k, K), dim=1)
    rows = torch.arange(B, device=pre_BK.device)[:, None].expand_as(cols)
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = sort_pairs(rows, cols, K)
    return rows[order], cols[order], vals[order]
