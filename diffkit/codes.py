"""One batch of an SAE's feature activations, as the dense matrix and as its nonzero entries.

Why: an SAE's codes are sparse (a TopK SAE of 65,536 features with k = 32 fires on 0.05% of the
matrix), yet every statistic of align's pass used to read the dense (rows, features) matrix —
float64 copies, column top-k, masks — and at 65k features those dense passes cost more than the
encoding GEMM itself. The nonzero entries are found once per batch (:class:`Codes`) and every
per-feature sum is a scatter over them, O(active) instead of O(rows × features). Codes that are
not sparse (more than :data:`DENSE_ABOVE` nonzero: an L1 crosscoder) keep the dense reductions.
"""

from __future__ import annotations

from typing import Any

# Above this fraction of nonzero codes the dense matrix's own reductions and GEMMs beat scatters over
# its entries: measured on `diffkit bench organisms`, whose L1 crosscoder fires on 9% of its latents
# (its analysis took twice as long through the entries); a 65,536-feature TopK SAE fires on 0.05%.
DENSE_ABOVE = 0.01


class Codes:
    """Feature activations of one batch: ``dense`` (rows, features) and, found once on first use,
    the nonzero entries ``row``, ``col`` (int64, row-major order) and ``val`` (float64)."""

    def __init__(self, dense: Any):
        self.dense = dense
        self._entries: tuple | None = None
        self._is_dense: bool | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense.shape)

    def __len__(self) -> int:
        return len(self.dense)

    @property
    def is_dense(self) -> bool:
        """More than :data:`DENSE_ABOVE` of the matrix is nonzero."""
        import torch

        if self._is_dense is None:
            n = self.dense.numel()
            self._is_dense = n > 0 and int(torch.count_nonzero(self.dense)) > DENSE_ABOVE * n
        return self._is_dense

    def entries(self) -> tuple[Any, Any, Any]:
        """(row, col, val) of the nonzero activations."""
        if self._entries is None:
            nz = self.dense.nonzero()
            row, col = nz[:, 0], nz[:, 1]
            self._entries = (row, col, self.dense[row, col].double())
        return self._entries

    def feature_sums(self) -> tuple[Any, Any, Any]:
        """Per feature: the number of rows where it is > 0, Σ f and Σ f² (float64)."""
        import torch

        if self.is_dense:
            f64 = self.dense.double()
            return (self.dense > 0).sum(0), f64.sum(0), (f64 * f64).sum(0)
        row, col, val = self.entries()
        n = self.shape[1]
        count = torch.bincount(col[val > 0], minlength=n)
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, col, val)
        sumsq = torch.zeros(n, dtype=torch.float64).index_add_(0, col, val * val)
        return count, total, sumsq

    def top_rows(self, m: int, row0: int = 0) -> tuple[Any, Any]:
        """Per feature its ``m`` largest activations in the batch and their rows (+ ``row0``); -1 pads."""
        import torch

        rows, n = self.shape
        if self.is_dense:
            top_val = torch.full((n, m), -1.0)
            top_row = torch.full((n, m), -1, dtype=torch.int64)
            kk = min(m, rows)
            if kk:
                bv, bi = self.dense.topk(kk, dim=0)
                fired = bv.T > 0  # as the entries' path: -1 where the feature did not fire
                top_val[:, :kk] = torch.where(fired, bv.T.float(), -1.0)
                top_row[:, :kk] = torch.where(fired, bi.T + row0, -1)
            return top_val, top_row
        row, col, val = self.entries()
        order = torch.argsort(val, descending=True, stable=True)
        order = order[torch.argsort(col[order], stable=True)]  # by feature, largest first within one
        c = col[order]
        count = torch.bincount(c, minlength=n)
        rank = torch.arange(len(c)) - (count.cumsum(0) - count)[c]
        keep = rank < m
        top_val = torch.full((n, m), -1.0)
        top_row = torch.full((n, m), -1, dtype=torch.int64)
        top_val[c[keep], rank[keep]] = val[order][keep].float()
        top_row[c[keep], rank[keep]] = row[order][keep] + row0
        return top_val, top_row

    def padded(self) -> tuple[Any, Any]:
        """Per row the indices and values (float64, clamped at 0) of its active features, padded
        with index 0 and value 0 to the most any row has (at least 1)."""
        import torch

        rows = self.shape[0]
        if self.is_dense:
            width = max(int((self.dense > 0).sum(1).max()) if rows else 0, 1)
            vals, idx = self.dense.topk(min(width, self.shape[1]), dim=1)
            return idx.long(), vals.double().clamp(min=0)
        row, col, val = self.entries()
        per_row = torch.bincount(row, minlength=rows)
        width = max(int(per_row.max()) if rows else 0, 1)
        slot = torch.arange(len(row)) - (per_row.cumsum(0) - per_row)[row]
        idx = torch.zeros((rows, width), dtype=torch.int64)
        vals = torch.zeros((rows, width), dtype=torch.float64)
        idx[row, slot] = col
        vals[row, slot] = val.clamp(min=0)
        return idx, vals


def keep_top(vals: Any, idx: Any, new_vals: Any, new_idx: Any, k: int) -> tuple[Any, Any]:
    """Per row, the ``k`` largest of ``vals`` and ``new_vals`` side by side, with their ``idx`` (a running top-k)."""
    import torch

    vals, idx = torch.cat([vals, new_vals], 1), torch.cat([idx, new_idx], 1)
    keep = vals.topk(k, dim=1).indices
    return vals.gather(1, keep), idx.gather(1, keep)


def as_codes(f: Any) -> Codes | None:
    """``f`` as :class:`Codes` (a dense tensor is wrapped; None stays None)."""
    return f if f is None or isinstance(f, Codes) else Codes(f)


class FeatureTally:
    """Streamed per feature: rows where it is > 0 (``count``), Σ f (``sum``), Σ f² (``sumsq``), all float64
    but ``count``, and its ``m`` largest activations with their rows (``top_val``/``top_row``, (n, m),
    largest first; -1 where it fired on fewer rows). Align's statistics pass and the crosscoder's analysis
    keep theirs with it; memory is O(n · m), whatever the number of rows."""

    def __init__(self, n: int, m: int):
        import torch

        self.m, self.rows = m, 0
        self.count = torch.zeros(n, dtype=torch.int64)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.sumsq = torch.zeros(n, dtype=torch.float64)
        self.top_val = torch.full((n, m), -1.0)
        self.top_row = torch.full((n, m), -1, dtype=torch.int64)

    def add(self, codes: Codes) -> None:
        """The next batch's codes (rows numbered on from the batches before)."""
        count, total, sumsq = codes.feature_sums()
        self.count += count
        self.sum += total
        self.sumsq += sumsq
        if self.m:
            self.top_val, self.top_row = keep_top(self.top_val, self.top_row, *codes.top_rows(self.m, self.rows), self.m)
        self.rows += len(codes)

    def examples(self) -> Any:
        """``top_row`` with -1 where the feature did not fire (no example there)."""
        top = self.top_row.clone()
        top[self.top_val <= 0] = -1
        return top
