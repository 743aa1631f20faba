"""One-to-one assignment of two feature sets: dense exact for small problems, a sparse candidate graph at scale.

Inputs are direction matrices with features as rows: A's decoder directions already carried into
B's space (``dirs_a``, n_a × d) and B's decoder directions (``dirs_b``, n_b × d). The cost of a pair
is ``1 − cos`` (or a blend with ``1 − corr`` of the two features' activations). Pairs are read the
right way round everywhere: ``pair_a[i]`` is matched to ``pair_b[i]`` (scipy returns (row_ind,
col_ind) with rows = A; using ``col_ind`` as if it were the inverse permutation was failure 3 of the
first training-free diff). Every assigned pair whose similarity is below ``threshold`` is dropped
and both features are reported unmatched (A-only, B-only): Hungarian matches everything,
including features with no counterpart (failure 5).

Solvers:

- ``dense``: scipy ``linear_sum_assignment`` on the full cost matrix (float64 copy: 16k² → 2 GB,
  65k² → 34 GB, so only for small problems; rectangular is fine).
- ``sparse``: each A row's top-k B neighbours and each B row's top-k A neighbours by cosine
  (chunked matmul, bfloat16 on CPU / float16 on GPU for speed, then every candidate edge re-scored
  exactly in float32), de-duplicated (a CSR matrix would *sum* duplicate edges), costs offset by
  +1 so none is zero (an explicit zero in a sparse matrix is no edge), solved by
  ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``. When the candidate graph has no
  full matching, k doubles and the search repeats. The optimum of the candidate graph equals the
  dense optimum whenever the optimal pairs are all among the candidates; tests check that on small
  problems. Memory: the inputs plus one chunk of similarities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DiffkitError

DENSE_MAX_CELLS = 4096 * 4096  # above this "auto" uses the sparse solver
EDGE_OFFSET = 1.0


@dataclass
class Assignment:
    """An optimal one-to-one assignment and the thresholded pairs.

    ``pair_a[i]``, ``pair_b[i]``, ``similarity[i]``: all assigned pairs (min(n_a, n_b) of them);
    ``matched``: the mask of pairs at or above the threshold; ``a_only`` / ``b_only``: features of
    each side in no matched pair (below threshold, or left over because the sides differ in size).
    """

    n_a: int
    n_b: int
    pair_a: np.ndarray
    pair_b: np.ndarray
    similarity: np.ndarray
    threshold: float
    solver: str
    k: int | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def matched(self) -> np.ndarray:
        return self.similarity >= self.threshold

    @property
    def total_cost(self) -> float:
        """Σ (1 − similarity) over all assigned pairs (what the solver minimised)."""
        return float((1.0 - self.similarity.astype(np.float64)).sum())

    @property
    def a_only(self) -> np.ndarray:
        keep = np.ones(self.n_a, bool)
        keep[self.pair_a[self.matched]] = False
        return np.nonzero(keep)[0]

    @property
    def b_only(self) -> np.ndarray:
        keep = np.ones(self.n_b, bool)
        keep[self.pair_b[self.matched]] = False
        return np.nonzero(keep)[0]


def unit_rows(x: Any, dtype: Any = None) -> Any:
    """Rows scaled to unit norm as a float32 torch tensor (a zero row stays zero)."""
    import torch

    x = torch.as_tensor(x).to(dtype or torch.float32)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(dirs_a: Any, dirs_b: Any) -> np.ndarray:
    """Dense (n_a, n_b) cosine similarities (float32)."""
    return (unit_rows(dirs_a) @ unit_rows(dirs_b).T).numpy()


def assign_dense(similarity: np.ndarray, threshold: float) -> Assignment:
    """Exact maximum-similarity assignment of a dense (n_a, n_b) similarity matrix."""
    from scipy.optimize import linear_sum_assignment

    t0 = time.perf_counter()
    rows, cols = linear_sum_assignment(1.0 - similarity)
    return Assignment(similarity.shape[0], similarity.shape[1], rows.astype(np.int64), cols.astype(np.int64),
                      similarity[rows, cols].astype(np.float32), threshold, "dense",
                      seconds={"assign": time.perf_counter() - t0})


def _search_dtype(device: str) -> Any:
    import torch

    return torch.float16 if device.startswith("cuda") else torch.bfloat16


def topk_candidates(ua: Any, ub: Any, k: int, chunk: int = 2048, device: str = "cpu",
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Candidate edges (a, b): each A row's top-k B rows and each B row's top-k A rows, de-duplicated.

    ``ua``, ``ub``: unit-row float32 tensors. The search runs in half precision (bf16 / fp16); only
    the *choice* of candidates depends on it, their costs are re-scored in float32 afterwards.
    """
    import torch
    from tqdm import tqdm

    n_a, n_b = len(ua), len(ub)
    ka, kb = min(k, n_b), min(k, n_a)
    dt = _search_dtype(device)
    hb = ub.to(device=device, dtype=dt)
    best_val = torch.full((kb, n_b), -float("inf"), device=device)  # per B column: best A rows so far
    best_idx = torch.zeros((kb, n_b), dtype=torch.int64, device=device)
    rows_a, rows_b = [], []
    for lo in tqdm(range(0, n_a, chunk), desc="candidates", unit="chunk", disable=not progress):
        sims = (ua[lo:lo + chunk].to(device=device, dtype=dt) @ hb.T).float()  # (c, n_b)
        top = sims.topk(ka, dim=1).indices
        rows_a.append((torch.arange(lo, lo + len(sims), device=device)[:, None].expand_as(top)).reshape(-1).cpu())
        rows_b.append(top.reshape(-1).cpu())
        col = sims.T.contiguous().topk(min(kb, len(sims)), dim=1)  # (n_b, ≤kb): this chunk's best A rows per column
        vals = torch.cat([best_val, col.values.T], 0)
        idx = torch.cat([best_idx, col.indices.T + lo], 0)
        keep = vals.topk(kb, dim=0).indices
        best_val, best_idx = vals.gather(0, keep), idx.gather(0, keep)
    col_b = torch.arange(n_b, device=device)[None, :].expand(kb, n_b)
    ea = torch.cat(rows_a + [best_idx.reshape(-1).cpu()]).numpy()
    eb = torch.cat(rows_b + [col_b.reshape(-1).cpu()]).numpy()
    key = np.unique(ea.astype(np.int64) * n_b + eb)  # duplicates would be summed by CSR
    return key // n_b, key % n_b


def edge_similarity(ua: Any, ub: Any, ea: np.ndarray, eb: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Exact float32 cosine of each candidate edge."""
    import torch

    out = np.empty(len(ea), np.float32)
    for lo in range(0, len(ea), chunk):
        ia = torch.from_numpy(ea[lo:lo + chunk])
        ib = torch.from_numpy(eb[lo:lo + chunk])
        out[lo:lo + chunk] = (ua[ia] * ub[ib]).sum(1).numpy()
    return out


def assign_sparse(dirs_a: Any, dirs_b: Any, threshold: float, k: int = 32, chunk: int = 2048, device: str = "cpu",
                  progress: bool = False) -> Assignment:
    """Maximum-cosine assignment on a top-k candidate graph, widening k until a full matching exists."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    ua, ub = unit_rows(dirs_a), unit_rows(dirs_b)
    n_a, n_b = len(ua), len(ub)
    seconds = {"candidates": 0.0, "rescore": 0.0, "assign": 0.0}
    while True:
        t0 = time.perf_counter()
        ea, eb = topk_candidates(ua, ub, k, chunk, device, progress)
        t1 = time.perf_counter()
        sim = edge_similarity(ua, ub, ea, eb)
        t2 = time.perf_counter()
        graph = csr_matrix(((1.0 - sim.astype(np.float64)) + EDGE_OFFSET, (ea, eb)), shape=(n_a, n_b))
        try:
            rows, cols = min_weight_full_bipartite_matching(graph)
            infeasible = False
        except ValueError:
            infeasible = True
        t3 = time.perf_counter()
        for key, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
            seconds[key] += dt
        if not infeasible:
            break
        if k >= max(n_a, n_b):
            raise AssertionError("the complete bipartite graph always has a full matching")
        k *= 2
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    order = np.argsort(rows)
    rows, cols = rows[order], cols[order]
    pair_sim = np.asarray(graph[rows, cols]).ravel() - EDGE_OFFSET
    return Assignment(n_a, n_b, rows, cols, (1.0 - pair_sim).astype(np.float32), threshold, "sparse", k=k,
                      seconds=seconds)


def assign(dirs_a: Any, dirs_b: Any, threshold: float, solver: str = "auto", k: int = 32,
           extra_similarity: np.ndarray | None = None, blend: float = 0.0, device: str = "cpu",
           progress: bool = False) -> Assignment:
    """Assign A's features to B's by cosine of their directions, optionally blended with another similarity.

    ``extra_similarity`` (n_a, n_b), e.g. activation correlation, enters as
    ``sim = (1 − blend)·cos + blend·extra``; it needs the dense solver (the full matrix exists anyway).
    """
    n_a, n_b = len(dirs_a), len(dirs_b)
    if n_a == 0 or n_b == 0:
        raise DiffkitError(f"cannot match an SAE with no features (sizes {n_a} and {n_b}): check the SAEs")
    if solver not in ("auto", "dense", "sparse"):
        raise DiffkitError(f"unknown solver {solver!r}: use auto, dense or sparse")
    if not 0.0 <= blend <= 1.0:
        raise DiffkitError(f"--blend must be within [0, 1], got {blend}")
    if solver == "auto":
        solver = "dense" if n_a * n_b <= DENSE_MAX_CELLS or extra_similarity is not None else "sparse"
    if extra_similarity is not None and solver == "sparse":
        raise DiffkitError("an activation-correlation cost needs the dense solver (the full matrix is computed): "
                           "use --solver dense, or drop --cost corr/blend for large SAEs")
    if solver == "sparse":
        return assign_sparse(dirs_a, dirs_b, threshold, k=k, device=device, progress=progress)
    t0 = time.perf_counter()
    sim = cosine_matrix(dirs_a, dirs_b)
    if extra_similarity is not None:
        sim = (1.0 - blend) * sim + blend * np.asarray(extra_similarity, dtype=np.float32)
    result = assign_dense(sim, threshold)
    result.seconds["cost"] = time.perf_counter() - t0 - result.seconds["assign"]
    return result
