"""Benchmarks of the training-free diff's heavy steps (``diffkit bench align``).

1. Feature alignment (cost + assignment) on a planted problem: B's decoder directions are random
   unit rows; A's are a known permutation of 90% of them with noise (true partners at cosine ~0.8,
   about what matched SAE features reach) plus 10% A-only random rows; d = 2304 (a gemma-2-2b
   residual). Timed from the two direction matrices to the pairs: diffkit's sparse solver
   (:func:`diffkit.matching.assign` with ``solver="sparse"``) vs scipy's dense
   ``linear_sum_assignment`` on the float32 cosine matrix (the baseline), at 16,384 features each,
   and diffkit alone at 65,536 (dense would need a 34 GB float64 copy). Each case runs in a fresh
   subprocess so its peak RSS (VmHWM) is its own; the inputs are generated in that process before
   the clock starts and their size is reported beside the peak.
2. Map fit throughput: :meth:`diffkit.linear_map.LinearMap.fit` streaming a store on disk
   (d_a = d_b = 1024) vs this machine's float64 GEMM rate measured in the same run on the same
   shape (``zᵀz`` of a (rows, d_a + d_b) float64 block) — the one GEMM the fit performs per shard.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .child import run_child
from .machine import LoadSample, MachineInfo, machine_info, max_rss_bytes, sample_load

D_MODEL = 2304
SHARED_FRACTION = 0.9
NOISE = 0.8  # relative norm of the noise added to a shared direction: cosine to its partner ~ 1/sqrt(1 + 0.64)
TARGET_16K_SECONDS = 10.0
TARGET_16K_GB = 4.0
TARGET_65K_SECONDS = 180.0
TARGET_65K_GB = 12.0
TARGET_GEMM_FRACTION = 0.5


@dataclass
class AlignCase:
    method: str          # "diffkit-sparse" | "scipy-dense"
    n: int
    d: int
    seconds: float
    peak_rss_bytes: int
    input_rss_bytes: int  # high-water mark once the inputs exist, before alignment
    total_cost: float
    shared_recovered: float  # fraction of planted shared pairs matched to their true partner (threshold 0.5)
    a_only_unmatched: float  # fraction of planted A-only features left unmatched
    stages: dict = field(default_factory=dict)
    k: int | None = None


@dataclass
class MapFitResult:
    tokens: int
    d_a: int
    d_b: int
    shard_rows: int
    stream_seconds: float   # the moment accumulation (read, convert, center, GEMM)
    fit_seconds: float      # the whole fit: stream + solve both directions + held-out scoring
    fit_flops: float
    gemm_gflops: float      # float64 zᵀz on a block of the shard's shape, in memory
    gemm_square_gflops: float  # float64 square matmul (d_a + d_b)³, for reference

    @property
    def stream_gflops(self) -> float:
        return self.fit_flops / self.stream_seconds / 1e9

    @property
    def fraction(self) -> float:
        return self.stream_gflops / self.gemm_gflops


@dataclass
class AlignBenchmark:
    started_utc: str
    quick: bool
    seconds: float
    machine: MachineInfo
    load: list[LoadSample]
    cases: list[AlignCase]
    map_fit: MapFitResult | None
    command: str

    @property
    def under_load(self) -> bool:
        return any(s.busy_percent > 30 for s in self.load)


def planted_directions(n: int, d: int, seed: int = 0) -> tuple[Any, Any, np.ndarray]:
    """(dirs_a, dirs_b, truth) float32 tensors; truth[i] = B row of A row i, −1 for A-only rows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dirs_b = torch.randn(n, d, generator=gen)
    dirs_b /= dirs_b.norm(dim=1, keepdim=True)
    n_shared = int(SHARED_FRACTION * n)
    perm = torch.randperm(n, generator=gen)  # A row r holds B row perm[r] if perm[r] < n_shared
    dirs_a = dirs_b[perm]
    shared = perm < n_shared
    noise = torch.randn(n, d, generator=gen) * (NOISE / d ** 0.5)
    dirs_a += noise
    dirs_a[~shared] = torch.randn(int((~shared).sum()), d, generator=gen)
    del noise
    truth = np.where(shared.numpy(), perm.numpy(), -1)
    return dirs_a, dirs_b, truth


def _child_align(spec: dict) -> dict:
    import torch

    from ..matching import assign, assign_dense, cosine_matrix

    torch.set_num_threads(spec["threads"])
    dirs_a, dirs_b, truth = planted_directions(spec["n"], spec["d"], spec["seed"])
    input_rss = max_rss_bytes()
    t0 = time.perf_counter()
    if spec["method"] == "diffkit-sparse":
        res = assign(dirs_a, dirs_b, 0.5, solver="sparse", k=spec.get("k", 32))
    elif spec["method"] == "lapjv":
        from .baselines import lapjv_assign

        sim = cosine_matrix(dirs_a, dirs_b)
        t1 = time.perf_counter()
        res = lapjv_assign(sim, 0.5)
        res.seconds["cost"] = t1 - t0
    else:
        sim = cosine_matrix(dirs_a, dirs_b)
        t1 = time.perf_counter()
        res = assign_dense(sim, 0.5)
        res.seconds["cost"] = t1 - t0
    seconds = time.perf_counter() - t0
    got = np.full(spec["n"], -1)
    got[res.pair_a[res.matched]] = res.pair_b[res.matched]
    shared = truth >= 0
    return {"method": spec["method"], "n": spec["n"], "d": spec["d"], "seconds": seconds,
            "peak_rss_bytes": max_rss_bytes(), "input_rss_bytes": input_rss, "total_cost": res.total_cost,
            "shared_recovered": float((got[shared] == truth[shared]).mean()),
            "a_only_unmatched": float((got[~shared] == -1).mean()), "stages": res.seconds, "k": res.k}


def _run_child(spec: dict, timeout: float = 1200) -> dict:
    target = "_child_map_fit" if spec["method"].startswith("mapfit-") else "_child_align"
    return run_child(f"{__name__}:{target}", spec, f"{spec['method']}, n={spec['n']:,}", timeout)


def _gemm_gflops(rows: int, d: int, repeats: int = 3) -> tuple[float, float]:
    """float64 GEMM rates: zᵀz of a (rows, d) block (the fit's shape) and a square d³ matmul."""
    import torch

    z = torch.randn(rows, d, dtype=torch.float64)
    sq = torch.randn(d, d, dtype=torch.float64)
    best_z = best_sq = float("inf")
    z.T @ z
    for _ in range(repeats):
        t0 = time.perf_counter()
        z.T @ z
        best_z = min(best_z, time.perf_counter() - t0)
        t0 = time.perf_counter()
        sq @ sq
        best_sq = min(best_sq, time.perf_counter() - t0)
    return 2.0 * rows * d * d / best_z / 1e9, 2.0 * d ** 3 / best_sq / 1e9


FIT_CTX, FIT_SEQS_PER_SHARD = 128, 128


def write_fit_store(work: Path, tokens: int, d: int) -> Path:
    """A store of ``tokens`` rows, d_a = d_b = d: B = A·M + noise, A Gaussian (a well-posed affine fit)."""
    from ..synthetic import PlantedConfig, PlantedPair, write_planted_store

    ctx, seqs_per_shard = FIT_CTX, FIT_SEQS_PER_SHARD
    cfg = PlantedConfig(d_a=d, d_b=d, n_shared=1, n_a_only=0, n_b_only=0, k=1, n_tokens=tokens, ctx=ctx,
                        heldout_every=10)
    rng = np.random.default_rng(0)
    acts_a = rng.standard_normal((tokens, d), dtype=np.float32)
    mix = (rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)  # np.sqrt: a float64 scalar
    acts_b = (acts_a @ mix + 0.1 * rng.standard_normal((tokens, d), dtype=np.float32)).astype(np.float32)
    zeros = np.zeros((tokens, 1), np.float32)
    pair = PlantedPair(cfg, np.ones((1, d), np.float32), np.ones((1, d), np.float32), np.zeros(1, np.int64),
                       np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), mix, zeros, zeros,
                       acts_a, acts_b, np.zeros(d, np.float32), np.zeros(d, np.float32))
    return write_planted_store(pair, work / "fit-store", seqs_per_shard=seqs_per_shard)


def bench_map_fit(work: Path, tokens: int, d: int, threads: int) -> MapFitResult:
    """Write a store of ``tokens`` rows (d_a = d_b = d) and fit a map on it; GEMM rate on the same shape."""
    import torch

    from ..activations import ActivationStore
    from ..linear_map import LinearMap

    torch.set_num_threads(threads)
    store = ActivationStore.open(write_fit_store(work, tokens, d))
    rows = FIT_CTX * FIT_SEQS_PER_SHARD
    gemm, square = _gemm_gflops(rows, 2 * d)
    t0 = time.perf_counter()
    lmap = LinearMap().fit(store)
    fit_seconds = time.perf_counter() - t0
    return MapFitResult(tokens=store.n_tokens("train"), d_a=d, d_b=d, shard_rows=rows,
                        stream_seconds=lmap.fit_seconds_, fit_seconds=fit_seconds, fit_flops=lmap.fit_flops_,
                        gemm_gflops=gemm, gemm_square_gflops=square)


def run_align_benchmark(quick: bool = False, threads: int = 2, skip_65k: bool = False,
                        log: Callable[[str], None] = print) -> AlignBenchmark:
    import torch

    t0 = time.time()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = [sample_load("before", 2.0)]
    d = 256 if quick else D_MODEL
    sizes = [2048] if quick else [16_384]
    cases = []
    for n in sizes:
        for method in ("diffkit-sparse", "scipy-dense"):
            log(f"align {method} n={n:,} d={d} ...")
            cases.append(AlignCase(**_run_child({"method": method, "n": n, "d": d, "seed": 0, "threads": threads})))
            log(f"  {cases[-1].seconds:.1f} s, peak RSS {cases[-1].peak_rss_bytes / 2**30:.2f} GiB")
    if not quick and not skip_65k:
        log(f"align diffkit-sparse n=65,536 d={d} ...")
        cases.append(AlignCase(**_run_child({"method": "diffkit-sparse", "n": 65_536, "d": d, "seed": 0,
                                             "threads": threads})))
        log(f"  {cases[-1].seconds:.1f} s, peak RSS {cases[-1].peak_rss_bytes / 2**30:.2f} GiB")
    log("map fit vs float64 GEMM ...")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="diffkit-bench-align-") as tmp:
        fit = bench_map_fit(Path(tmp), tokens=8192 if quick else 65_536, d=128 if quick else 1024, threads=threads)
    log(f"  stream {fit.stream_gflops:.1f} GFLOP/s vs GEMM {fit.gemm_gflops:.1f} GFLOP/s ({fit.fraction:.0%})")
    load.append(sample_load("after", 2.0))
    command = "diffkit bench align" + (" --quick" if quick else "") + (" --skip-65k" if skip_65k else "") + \
        (f" --threads {threads}" if threads != 2 else "")
    return AlignBenchmark(started, quick, time.time() - t0, machine_info(threads), load, cases, fit, command)


# -- rows for ``diffkit bench all`` ----------------------------------------------------------------

ALIGN_SIZES = {"tiny": ([512], 64), "small": ([8192], D_MODEL), "full": ([16_384, 65_536], D_MODEL)}
# (tokens, d per model); full: the lstsq baseline holds ~8 GB (float32 inputs, float64 design + copies)
FIT_SIZES = {"tiny": (8192, 32), "small": (131_072, 512), "full": (262_144, 1024)}
DENSE_MAX_N = 16_384  # above this the dense baselines' float64 cost copy alone is 34 GB at 65,536: not run


def _child_map_fit(spec: dict) -> dict:
    """A map fit in a fresh process: ``mapfit-stream`` (LinearMap.fit over the store) or ``mapfit-lstsq``
    (the train split read into memory, then ``np.linalg.lstsq``); W and b of A→B saved to ``spec["out"]``."""
    import torch

    from ..activations import ActivationStore
    from ..linear_map import LinearMap
    from .baselines import lstsq_affine

    torch.set_num_threads(spec["threads"])
    store = ActivationStore.open(spec["store"])
    input_rss = max_rss_bytes()
    load_seconds = 0.0
    t0 = time.perf_counter()
    if spec["method"] == "mapfit-stream":
        lmap = LinearMap().fit(store)
        W, b, n_train = lmap.W_ab_, lmap.b_ab_, lmap.n_train_
    else:
        parts = [(a.numpy(), b.numpy()) for a, b in store.iter_shards("train", normalized=False)]
        x_a = np.concatenate([p[0] for p in parts])
        x_b = np.concatenate([p[1] for p in parts])
        del parts
        load_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        W, b = lstsq_affine(x_a, x_b)
        n_train = len(x_a)
    seconds = time.perf_counter() - t0
    np.save(Path(spec["out"]) / f"{spec['method']}-W.npy", W)
    np.save(Path(spec["out"]) / f"{spec['method']}-b.npy", b)
    return {"seconds": seconds, "load_seconds": load_seconds, "peak_rss_bytes": max_rss_bytes(),
            "input_rss_bytes": input_rss, "n_train": int(n_train)}


def _mib(n: float) -> float:
    return n / 2**20


def summary_rows(size: str, work: Path, threads: int, log: Callable[[str], None]) -> list:
    """The ``align`` part of ``diffkit bench all``: cost + assignment of planted directions, diffkit's sparse
    solver vs scipy's dense ``linear_sum_assignment`` and ``lap.lapjv`` (where installed), each in a fresh
    process; the same optimum is checked (total cost) and the planted pairs recovered are noted."""
    from .baselines import lap_status
    from .rows import BenchRow, speedup

    sizes, d = ALIGN_SIZES[size]
    lap_version = lap_status()
    rows = []
    for n in sizes:
        got = {}
        methods = ["diffkit-sparse"] + (["scipy-dense"] + (["lapjv"] if lap_version else []) if n <= DENSE_MAX_N
                                        else [])
        for method in methods:
            got[method] = _run_child({"method": method, "n": n, "d": d, "seed": 0, "threads": threads})
            log(f"  {method} n={n:,} d={d}: {got[method]['seconds']:.1f} s, "
                f"peak RSS {_mib(got[method]['peak_rss_bytes']):,.0f} MiB")
        ours = got["diffkit-sparse"]
        case = f"assignment (cost + solve), {n:,} × {n:,} planted features, d {d}"
        recovered = (f"planted pairs recovered {ours['shared_recovered']:.1%}, A-only left unmatched "
                     f"{ours['a_only_unmatched']:.1%}")
        if n > DENSE_MAX_N:
            rows.append(BenchRow("align", case, ours["seconds"], "s",
                                 f"dense solvers: not run (a {n:,}² float64 cost copy is "
                                 f"{n * n * 8 / 1e9:.0f} GB)", None, None, ours["peak_rss_bytes"], "cpu", recovered))
            continue
        baselines = [("scipy-dense", "scipy `linear_sum_assignment` (dense)"),
                     ("lapjv", f"`lap.lapjv` {lap_version} (dense)" if lap_version else "`lap.lapjv`: not installed")]
        for method, label in baselines:
            base = got.get(method)
            if base is None:
                rows.append(BenchRow("align", case, ours["seconds"], "s", label, None, None, ours["peak_rss_bytes"],
                                     "cpu", "install the `bench` extra (pip install lap) for this baseline"))
                continue
            same = abs(base["total_cost"] - ours["total_cost"]) <= 1e-4 * max(1.0, abs(base["total_cost"]))
            optimum = (f"same optimum (total cost {ours['total_cost']:,.3f})" if same else
                       f"OPTIMUM DIFFERS: total cost {ours['total_cost']:,.3f} vs {base['total_cost']:,.3f}")
            rows.append(BenchRow("align", case, ours["seconds"], "s", label, base["seconds"],
                                 speedup(ours["seconds"], base["seconds"]), ours["peak_rss_bytes"], "cpu",
                                 f"{optimum}; {recovered}"))
            rows.append(BenchRow("align", f"peak RSS, {case}", _mib(ours["peak_rss_bytes"]), "MiB", label,
                                 _mib(base["peak_rss_bytes"]), speedup(ours["peak_rss_bytes"], base["peak_rss_bytes"]),
                                 ours["peak_rss_bytes"], "cpu", "each in a fresh process (VmHWM), inputs included"))
    return rows


def map_fit_summary_rows(size: str, work: Path, threads: int, log: Callable[[str], None]) -> list:
    """The ``mapfit`` part of ``diffkit bench all``: ``LinearMap.fit`` streaming a store vs numpy's in-memory
    ``lstsq`` on the same train rows, each in a fresh process; the two A→B maps must agree."""
    from .rows import BenchRow, speedup

    tokens, d = FIT_SIZES[size]
    work = Path(work)
    log(f"  writing a {tokens:,}-token store, d {d} + {d} ...")
    store = write_fit_store(work, tokens, d)
    got = {}
    for method in ("mapfit-stream", "mapfit-lstsq"):
        got[method] = _run_child({"method": method, "n": tokens, "store": str(store), "out": str(work),
                                  "threads": threads})
        log(f"  {method}: {got[method]['seconds']:.1f} s, peak RSS {_mib(got[method]['peak_rss_bytes']):,.0f} MiB")
    W = {m: np.load(work / f"{m}-W.npy") for m in got}
    b = {m: np.load(work / f"{m}-b.npy") for m in got}
    err = max(float(np.abs(W["mapfit-stream"] - W["mapfit-lstsq"]).max() / np.abs(W["mapfit-lstsq"]).max()),
              float(np.abs(b["mapfit-stream"] - b["mapfit-lstsq"]).max() / max(np.abs(W["mapfit-lstsq"]).max(), 1e-12)))
    agree = f"answers agree (max relative difference of W, b {err:.1e})" if err < 1e-6 else \
        f"ANSWERS DIFFER: max relative difference of W, b {err:.1e}"
    ours, base = got["mapfit-stream"], got["mapfit-lstsq"]
    n_train = ours["n_train"]
    if base["n_train"] != n_train:
        agree += f"; TRAIN ROWS DIFFER: {n_train:,} vs {base['n_train']:,}"
    case = f"affine map fit, {n_train:,} train tokens, d {d} → {d}"
    label = "numpy in-memory `np.linalg.lstsq` (A→B only)"
    return [BenchRow("mapfit", case, ours["seconds"], "s", label, base["seconds"], speedup(ours["seconds"], base["seconds"]),
                     ours["peak_rss_bytes"], "cpu",
                     f"{agree}; diffkit fits both directions + held-out FVE in its time; the baseline's time "
                     f"excludes reading the store into memory ({base['load_seconds']:.1f} s)"),
            BenchRow("mapfit", f"peak RSS, {case}", _mib(ours["peak_rss_bytes"]), "MiB", label,
                     _mib(base["peak_rss_bytes"]), speedup(ours["peak_rss_bytes"], base["peak_rss_bytes"]),
                     ours["peak_rss_bytes"], "cpu", "each in a fresh process (VmHWM); the baseline holds the train "
                     f"split in memory ({n_train * 2 * d * 4 / 2**20:,.0f} MiB as float32)")]
