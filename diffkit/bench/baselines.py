"""Baselines shared by the benchmarks: what a figure of diffkit is compared with, measured in the same run.

- :func:`gemm_gflops`: this machine's dense matmul rate (torch, float32 or float64) at a given shape:
  the reference every throughput can be read against;
- :func:`lapjv_assign`: ``lap.lapjv`` (a Jonker-Volgenant dense solver, optional extra ``bench``),
  imported lazily; :func:`lap_status` says whether it is installed;
- :func:`lstsq_affine`: numpy's in-memory ``np.linalg.lstsq`` of an affine map (a ones column
  appended), the textbook fit that :class:`diffkit.linear_map.LinearMap` streams instead.

scipy's dense ``linear_sum_assignment`` is :func:`diffkit.matching.assign_dense` and plain
``run_with_cache`` lives in :mod:`diffkit.bench.collect`: they are used from there.

``summary_rows`` here is the ``matmul`` part of ``diffkit bench all``: the GEMM rates as reference
rows (no baseline, no ratio).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .rows import BenchRow

# The shapes the reference rates are taken at: the assignment's candidate search (a 4096-row chunk
# of A's directions against B's at d = 2304) and the map fit's zᵀz (a 16k-row shard, d_a + d_b = 2048).
GEMM_SHAPES = {"assignment chunk (4096×2304)·(2304×4096)": (4096, 2304, 4096),
               "map-fit zᵀz (2048×16384)·(16384×2048)": (2048, 16384, 2048)}


def gemm_gflops(m: int, k: int, n: int, dtype: str = "float32", threads: int | None = None,
                repeats: int = 3) -> float:
    """GFLOP/s (2·m·k·n per product) of ``torch.mm`` on (m, k) @ (k, n): the best of ``repeats`` after a warm-up."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen, dtype=dt)
    b = torch.randn(k, n, generator=gen, dtype=dt)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def lap_status() -> str | None:
    """``lap``'s version, or None where it is not installed (it is an optional extra: ``pip install .[bench]``)."""
    try:
        import lap
    except ImportError:
        return None
    return str(getattr(lap, "__version__", "installed"))


def lapjv_assign(similarity: np.ndarray, threshold: float) -> Any:
    """Exact maximum-similarity assignment of a dense square similarity matrix by ``lap.lapjv``.

    Returns a :class:`diffkit.matching.Assignment` (the same thresholding as the other solvers), or
    raises ImportError where ``lap`` is not installed. lapjv wants a float64 cost matrix: the copy
    ``1 - similarity`` is part of its cost, as scipy's own float64 copy is part of scipy's.
    """
    import lap

    from ..matching import Assignment

    n_a, n_b = similarity.shape
    t0 = time.perf_counter()
    cost = 1.0 - similarity.astype(np.float64)
    _, x, _ = lap.lapjv(cost, extend_cost=n_a != n_b)
    del cost
    rows = np.nonzero(x >= 0)[0].astype(np.int64)
    cols = x[rows].astype(np.int64)
    return Assignment(n_a, n_b, rows, cols, similarity[rows, cols].astype(np.float32), threshold, "lapjv",
                      seconds={"assign": time.perf_counter() - t0})


def lstsq_affine(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) minimising ‖x W + b − y‖² with numpy's in-memory ``lstsq`` (a ones column for the bias).

    The whole float64 design matrix lives in memory: this is the baseline for the streamed fit.
    """
    x64 = np.empty((x.shape[0], x.shape[1] + 1))
    x64[:, :-1] = x
    x64[:, -1] = 1.0
    coef = np.linalg.lstsq(x64, np.asarray(y, dtype=np.float64), rcond=None)[0]
    return coef[:-1], coef[-1]


def summary_rows(size: str, work: Path, threads: int, log: Callable[[str], None]) -> list[BenchRow]:
    """The ``matmul`` part of ``diffkit bench all``: GEMM GFLOP/s in float32 and float64 (reference rows)."""
    from .machine import max_rss_bytes

    repeats = {"tiny": 1, "small": 3, "full": 5}[size]
    rows = []
    for name, (m, k, n) in GEMM_SHAPES.items():
        if size == "tiny":
            m, k, n = m // 16, k // 16, n // 16
            name = f"{name} /16 per side"
        for dtype in ("float32", "float64"):
            rate = gemm_gflops(m, k, n, dtype, threads, repeats)
            log(f"  {dtype} {name}: {rate:.1f} GFLOP/s")
            rows.append(BenchRow("matmul", f"torch.mm {dtype}, {name}", rate, "GFLOP/s",
                                 peak_rss_bytes=max_rss_bytes(), device="cpu",
                                 note=f"reference: best of {repeats}, {threads} threads"))
    return rows
