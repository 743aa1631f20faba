"""Benchmarks of the activation-collection stage (``diffkit bench collect``).

Three measurements, each against a baseline measured in the same run:

1. forward speed of :func:`diffkit.forward.hook_activations` (stops after the hook's block, keeps
   one tensor) vs a plain ``model.run_with_cache(tokens)`` of the whole model;
2. end-to-end :func:`diffkit.activations.collect_activations` tokens/s and peak RSS at two token
   counts vs a naive in-memory collection (``run_with_cache``, activations kept in a list), each
   run in a fresh subprocess because an RSS high-water mark never goes down within a process;
3. shuffled read throughput of ``ActivationStore.iter_batches`` vs a sequential ``np.load`` of the
   same shard files.

The functions return dataclasses of figures; :mod:`diffkit.bench.collect_report` formats them.
torch and TransformerLens are imported inside functions, so ``diffkit --help`` stays cheap.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..errors import DiffkitError
from .child import run_child
from .machine import LoadSample, MachineInfo, RssSampler, machine_info, max_rss_bytes, sample_load

REPORT_COMMAND = "diffkit bench collect"

# Section 1: the model whose forward pass is timed (random init; 8 layers so that stopping early matters).
FORWARD_MODEL = dict(n_layers=8, d_model=256, n_heads=8, d_head=32, d_mlp=1024, n_ctx=128, d_vocab=258,
                     normalization_type="LN", act_fn="gelu", seed=0)
# Section 2: the zoo pair whose activations are collected, at the hook of the zoo's SAEs.
COLLECT_MODELS = ("zoo:base", "zoo:finetuned")
COLLECT_HOOK = "blocks.0.hook_resid_post"
EARLY_HOOK = "blocks.1.hook_resid_post"
CORPUS = "mixed"
READ_BATCH = 4096

TARGET_FORWARD_SPEEDUP = 2.0
TARGET_READ_GBPS = 1.0


@dataclass
class ForwardRow:
    hook: str
    stop_layer: int | None
    diffkit_tokens_per_s: float
    baseline_tokens_per_s: float

    @property
    def speedup(self) -> float:
        return self.diffkit_tokens_per_s / self.baseline_tokens_per_s


@dataclass
class ForwardResult:
    model: dict
    batch: int
    ctx: int
    repeats: int
    rows: list[ForwardRow]
    diffkit_seconds: dict[str, list[float]]
    baseline_seconds: list[float]


@dataclass
class CollectRun:
    method: str  # "diffkit" (collect_activations to disk) or "in-memory" (run_with_cache into a list)
    tokens: int
    seconds: float            # the collection itself (models loaded before the clock starts for in-memory)
    rss_before_bytes: int     # high-water mark once torch, TransformerLens and the models are loaded
    peak_rss_bytes: int       # high-water mark at the end of the child process
    activation_bytes: int     # bytes of activations produced (both models)
    shards: int | None = None        # shards written (diffkit only)
    shard_tokens: int | None = None  # tokens in the largest shard (diffkit only)
    rss_halves_bytes: list[int] = field(default_factory=list)  # sampled peak RSS, 1st and 2nd half of the run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def growth_bytes(self) -> int:
        return self.peak_rss_bytes - self.rss_before_bytes


@dataclass
class CollectResult:
    models: str  # "`A` vs `B`"
    hook: str
    corpus: str
    batch_size: int
    runs: list[CollectRun]
    processes: str  # how each run got its own process


@dataclass
class ReadResult:
    store_tokens: int          # rows in the store (all splits)
    split: str
    rows_per_pass: int         # rows iter_batches delivers per epoch (train split, full batches)
    bytes_per_pass: int        # activation bytes iter_batches delivers per epoch (a + b, float32)
    shuffled_seconds: list[float]
    baseline_bytes: int        # bytes of the shard files' arrays (a + b, all rows)
    baseline_seconds: list[float]

    @property
    def shuffled_gbps(self) -> float:
        return self.bytes_per_pass / statistics.median(self.shuffled_seconds) / 1e9

    @property
    def baseline_gbps(self) -> float:
        return self.baseline_bytes / statistics.median(self.baseline_seconds) / 1e9


@dataclass
class CollectBenchmark:
    quick: bool
    started_utc: str
    seconds: float
    machine: MachineInfo
    load: list[LoadSample]
    forward: ForwardResult
    collect: CollectResult
    read: ReadResult
    section_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def under_load(self) -> bool:
        return any(s.busy_percent >= 20 for s in self.load)

    @property
    def command(self) -> str:
        return REPORT_COMMAND + (" --quick" if self.quick else "")


# -- 1. forward pass -----------------------------------------------------------------------------

def _random_model(config: dict) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(HookedTransformerConfig(**config))
    model.eval()
    return model


def bench_forward(batch: int = 32, repeats: int = 5, threads: int = 2) -> ForwardResult:
    """Tokens/s of ``hook_activations`` at an early and at the last layer vs ``run_with_cache(tokens)``.

    One warm-up call each, then ``repeats`` rounds in which the three calls alternate (so drifting
    background load hits them alike); the median time is reported. The baseline runs under
    ``torch.no_grad()`` like ``hook_activations`` does, so only the layers run and the hooks cached
    differ, not autograd bookkeeping.
    """
    import torch

    from ..forward import hook_activations, stop_layer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _random_model(FORWARD_MODEL)
    ctx = FORWARD_MODEL["n_ctx"]
    tokens = torch.randint(0, FORWARD_MODEL["d_vocab"], (batch, ctx))
    hooks = [EARLY_HOOK, f"blocks.{FORWARD_MODEL['n_layers'] - 1}.hook_resid_post"]

    def baseline() -> None:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        del cache

    calls: dict[str, Callable[[], Any]] = {h: (lambda h=h: hook_activations(model, tokens, h)) for h in hooks}
    calls["baseline"] = baseline
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    n = batch * ctx
    base_tps = n / statistics.median(seconds["baseline"])
    rows = [ForwardRow(h, stop_layer(model, h), n / statistics.median(seconds[h]), base_tps) for h in hooks]
    return ForwardResult(dict(FORWARD_MODEL), batch, ctx, repeats, rows, {h: seconds[h] for h in hooks},
                         seconds["baseline"])


# -- 2. end-to-end collection in fresh subprocesses ----------------------------------------------

def _collect_config(spec: dict) -> Any:
    from ..activations import CollectConfig

    return CollectConfig(model_a=spec["model_a"], model_b=spec["model_b"], hook_a=spec["hook"],
                         hook_b=spec["hook"], corpus=spec["corpus"], tokens=spec["tokens"],
                         batch_size=spec["batch_size"])


def _child_diffkit(spec: dict) -> dict:
    from ..activations import collect_activations
    from ..models import load_model
    from ..store_format import read_manifest

    for key in ("model_a", "model_b"):  # load once first, as the baseline does, before the RSS reading
        load_model(spec[key])
    rss_before = max_rss_bytes()
    out = Path(spec["out"])
    t0 = time.time()
    summary = collect_activations(_collect_config(spec), out, progress=False)
    t1 = time.time()
    manifest = read_manifest(out)
    width = sum(int(manifest["sources"][src]["d_model"]) for src in ("a", "b"))
    return {"tokens": summary.tokens, "seconds": summary.seconds, "rss_before_bytes": rss_before,
            "activation_bytes": summary.tokens * width * 4, "shards": summary.shards,
            "shard_tokens": max(s["n_tokens"] for s in manifest["shards"]), "t0": t0, "t1": t1}


def _child_in_memory(spec: dict) -> dict:
    """The naive collection: ``run_with_cache`` of the whole model, the hook's rows kept in a list."""
    import numpy as np
    import torch

    from ..activations import plan_sequences
    from ..models import load_model

    cfg = _collect_config(spec)
    loaded = [load_model(cfg.model_a), load_model(cfg.model_b)]
    models, tokenizer = [m.model for m in loaded], loaded[0].tokenizer
    rss_before = max_rss_bytes()
    t0 = time.time()
    kept: list[list[Any]] = [[], []]
    tokens = 0
    plan = plan_sequences(cfg, tokenizer)
    with torch.inference_mode():
        while True:
            chunk = [item for _, item in zip(range(cfg.batch_size), plan)]
            if not chunk:
                break
            ids = torch.from_numpy(np.stack([s.ids for s, _ in chunk]).astype(np.int64))
            flat = torch.from_numpy(np.concatenate([row * cfg.ctx + keep for row, (_, keep) in enumerate(chunk)]))
            for model, parts in zip(models, kept):
                _, cache = model.run_with_cache(ids)
                act = cache[cfg.hook_a]
                parts.append(act.reshape(-1, act.shape[-1])[flat].float().numpy())
                del cache, act
            tokens += len(flat)
    t1 = time.time()
    act_bytes = sum(p.nbytes for parts in kept for p in parts)
    return {"tokens": tokens, "seconds": t1 - t0, "rss_before_bytes": rss_before, "activation_bytes": act_bytes,
            "t0": t0, "t1": t1}


def _child_collect(spec: dict) -> dict:
    """One collection in a measurement subprocess (:func:`diffkit.bench.child.run_child`), with its RSS samples."""
    import torch

    torch.set_num_threads(spec["threads"])
    warnings.simplefilter("ignore", DeprecationWarning)
    fn = {"diffkit": _child_diffkit, "in-memory": _child_in_memory}[spec["method"]]
    sampler = RssSampler()
    sampler.start()
    try:
        result = fn(spec)
    finally:
        sampler.stop()
    result["peak_rss_bytes"] = max_rss_bytes()
    result["rss_halves_bytes"] = sampler.halves(result.pop("t0"), result.pop("t1"))
    return result


def _run_child(spec: dict, timeout: float = 1800) -> dict:
    return run_child(f"{__name__}:_child_collect", spec, f"{spec['method']}, {spec['tokens']:,} tokens", timeout)


def bench_collect(token_counts: tuple[int, ...], work: Path, model_a: str = COLLECT_MODELS[0],
                  model_b: str = COLLECT_MODELS[1], hook: str = COLLECT_HOOK, threads: int = 2, batch_size: int = 32,
                  log: Callable[[str], None] = lambda _: None) -> tuple[CollectResult, dict[int, Path]]:
    """Each token count with diffkit (store written under ``work``) and with the in-memory baseline,
    each run in its own fresh process. Returns the figures and the diffkit store of each token count."""
    runs, stores = [], {}
    for tokens in token_counts:
        for method in ("diffkit", "in-memory"):
            out = Path(work) / f"store_{tokens}"
            spec = {"method": method, "model_a": model_a, "model_b": model_b, "hook": hook,
                    "corpus": CORPUS, "tokens": tokens, "batch_size": batch_size, "threads": threads,
                    "out": str(out)}
            log(f"  {method:<9} {tokens:>9,} tokens (fresh process) ...")
            fig = _run_child(spec)
            run = CollectRun(method, fig["tokens"], fig["seconds"], fig["rss_before_bytes"],
                             fig["peak_rss_bytes"], fig["activation_bytes"], fig.get("shards"),
                             fig.get("shard_tokens"), fig.get("rss_halves_bytes", []))
            runs.append(run)
            log(f"    {run.tokens_per_s:,.0f} tokens/s, peak RSS {run.peak_rss_bytes / 2**20:,.0f} MiB")
            if method == "diffkit":
                stores[tokens] = out
    result = CollectResult(f"`{model_a}` vs `{model_b}`", hook, CORPUS, batch_size, runs,
                           "a fresh `python -c` subprocess")
    return result, stores


# -- 3. shuffled reads ---------------------------------------------------------------------------

def bench_read(store_path: Path, batch_size: int = READ_BATCH, repeats: int = 2, threads: int = 2) -> ReadResult:
    """GB/s of ``iter_batches(batch_size, shuffle=True)`` (train split, normalized: the defaults) vs a
    sequential ``np.load`` of the store's activation shard files, both after a warm-up pass."""
    import numpy as np
    import torch

    from ..activations import ActivationStore
    from ..store_format import shard_files

    torch.set_num_threads(threads)
    store = ActivationStore.open(store_path)

    def shuffled_pass(epoch: int) -> tuple[int, int, float]:
        rows = nbytes = 0
        t0 = time.perf_counter()
        for a, b in store.iter_batches(batch_size, shuffle=True, epoch=epoch):
            rows += a.shape[0]
            nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
        return rows, nbytes, time.perf_counter() - t0

    files = [store.root / shard_files(s)[src] for s in range(store.n_shards) for src in ("a", "b")]

    def sequential_pass() -> tuple[int, float]:
        nbytes = 0
        t0 = time.perf_counter()
        for path in files:
            nbytes += np.load(path, allow_pickle=False).nbytes
        return nbytes, time.perf_counter() - t0

    shuffled_pass(epoch=0)  # warm-up: page cache hot, memory maps opened
    sequential_pass()
    shuffled, sequential = [], []
    rows = nbytes = base_bytes = 0
    for i in range(repeats):  # alternate, so drifting background load hits both alike
        rows, nbytes, sec = shuffled_pass(epoch=1 + i)
        shuffled.append(sec)
        base_bytes, sec = sequential_pass()
        sequential.append(sec)
    return ReadResult(store.n_tokens("all"), "train", rows, nbytes, shuffled, base_bytes, sequential)


# -- the whole benchmark -------------------------------------------------------------------------

def run_collect_benchmark(quick: bool = False, threads: int = 2,
                          log: Callable[[str], None] = lambda _: None) -> CollectBenchmark:
    """All three measurements. Full: 100k vs 1M tokens (~3-4 min on 2 cores); quick: 20k vs 100k."""
    if threads <= 0:
        raise DiffkitError(f"--threads must be positive, got {threads}")
    import torch

    t_start = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    torch.set_num_threads(threads)
    machine = machine_info(threads)
    interval = 0.5 if quick else 1.0
    load = [sample_load("before", interval)]
    if load[0].busy_percent >= 20:
        log(f"note: other processes use {load[0].busy_percent:.0f}% CPU: timings are taken under load")
    sections = {}

    log("1/3 forward pass: hook_activations vs run_with_cache ...")
    t0 = time.perf_counter()
    forward = bench_forward(batch=8 if quick else 32, repeats=3 if quick else 5, threads=threads)
    sections["forward"] = time.perf_counter() - t0
    for row in forward.rows:
        log(f"    {row.hook}: {row.diffkit_tokens_per_s:,.0f} vs {row.baseline_tokens_per_s:,.0f} tokens/s "
            f"({row.speedup:.2f}x)")

    counts = (20_000, 100_000) if quick else (100_000, 1_000_000)
    with tempfile.TemporaryDirectory(prefix="diffkit-bench-") as tmp:
        log(f"2/3 end-to-end collection, {counts[0]:,} vs {counts[1]:,} tokens ...")
        t0 = time.perf_counter()
        collect, stores = bench_collect(counts, Path(tmp), threads=threads, log=log)
        sections["collect"] = time.perf_counter() - t0

        log(f"3/3 shuffled reads of the {counts[-1]:,}-token store ...")
        t0 = time.perf_counter()
        read = bench_read(stores[counts[-1]], repeats=2 if quick else 3, threads=threads)
        sections["read"] = time.perf_counter() - t0
        log(f"    iter_batches {read.shuffled_gbps:.2f} GB/s, sequential np.load {read.baseline_gbps:.2f} GB/s")
    load.append(sample_load("after", interval))
    return CollectBenchmark(quick, started, time.perf_counter() - t_start, machine, load, forward, collect, read,
                            sections)


# -- rows for ``diffkit bench all`` ----------------------------------------------------------------

# size -> (forward batch, forward repeats, token counts collected, read repeats)
SUMMARY_SIZES = {"small": (16, 3, (100_000,), 2), "full": (32, 5, (100_000, 1_000_000), 3)}


def summary_rows(size: str, work: Path, threads: int, log: Callable[[str], None]) -> list:
    """The ``collect`` part of ``diffkit bench all``: the same three measurements as ``diffkit bench collect``
    (smaller at ``small``), as rows: forward vs ``run_with_cache``, collection tokens/s and peak RSS vs the
    in-memory ``run_with_cache`` collection (fresh processes), shuffled reads vs sequential ``np.load``."""
    import torch

    from .rows import BenchRow, speedup, throughput_ratio

    batch, repeats, counts, read_repeats = SUMMARY_SIZES[size]
    torch.set_num_threads(threads)
    forward = bench_forward(batch=batch, repeats=repeats, threads=threads)
    early = forward.rows[0]
    log(f"  forward to {early.hook}: {early.speedup:.2f}x run_with_cache")
    rows = [BenchRow("collect", f"forward to `{early.hook}` of an 8-layer model ({batch}×{forward.ctx} tokens)",
                     early.diffkit_tokens_per_s, "tokens/s", "`run_with_cache(tokens)`, whole model",
                     early.baseline_tokens_per_s, throughput_ratio(early.diffkit_tokens_per_s,
                                                                   early.baseline_tokens_per_s),
                     max_rss_bytes(), "cpu", f"median of {repeats}, alternating; both under no_grad")]
    collect, stores = bench_collect(counts, Path(work), threads=threads, log=log)
    for tokens, i in zip(counts, range(0, len(collect.runs), 2)):
        ours, base = collect.runs[i], collect.runs[i + 1]  # bench_collect runs diffkit, then in-memory, per count
        case = f"collect {tokens:,} tokens, {collect.models}, `{collect.hook}`"
        label = "in-memory `run_with_cache` into a list"
        rows.append(BenchRow("collect", case, ours.tokens_per_s, "tokens/s", label, base.tokens_per_s,
                             throughput_ratio(ours.tokens_per_s, base.tokens_per_s), ours.peak_rss_bytes, "cpu",
                             "each in a fresh process; diffkit's time includes writing and hashing the shards"))
        rows.append(BenchRow("collect", f"peak RSS, {case}", ours.peak_rss_bytes / 2**20, "MiB", label,
                             base.peak_rss_bytes / 2**20, speedup(ours.peak_rss_bytes, base.peak_rss_bytes),
                             ours.peak_rss_bytes, "cpu",
                             f"VmHWM; activations produced {ours.activation_bytes / 2**20:,.0f} MiB"))
    read = bench_read(stores[counts[-1]], repeats=read_repeats, threads=threads)
    log(f"  shuffled reads {read.shuffled_gbps:.2f} GB/s vs sequential {read.baseline_gbps:.2f} GB/s")
    rows.append(BenchRow("collect", f"shuffled reads, `iter_batches({READ_BATCH})` of the {counts[-1]:,}-token store",
                         read.shuffled_gbps, "GB/s", "sequential `np.load` of the shard files", read.baseline_gbps,
                         throughput_ratio(read.shuffled_gbps, read.baseline_gbps), max_rss_bytes(), "cpu",
                         "a baseline with no shuffling: a ratio below 1 is the price of random order"))
    return rows
