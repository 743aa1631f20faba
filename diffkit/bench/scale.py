"""Scale benchmark (``diffkit bench scale``): the whole ``diffkit align`` on wide planted SAEs, and a
32k-latent crosscoder trained from two store sizes, one of them larger than this machine's memory.

1. **Align at scale.** A planted pair (:class:`diffkit.synthetic.PlantedStream`: 90% shared
   features through a hidden rotation, 5% exclusive to each side, k = 32 active per token) is
   written as an ActivationStore shard by shard (the dense codes of 65,536 features would need
   tokens × features floats), and its generating dictionaries as sae-lens TopK SAEs (decoder rows
   jittered, so true pairs sit at cosine ≈ 0.8 as trained SAEs do). A fresh process then runs
   what ``diffkit align --sae-a --sae-b --acts --out`` runs — open the store, load both SAEs, fit
   the map (≥ 10·d train tokens), :func:`diffkit.diff.align`, save the FeatureDiff — timing each
   stage and reading its peak RSS (VmHWM) and its largest sampled anonymous memory (RssAnon).
   Scored against the answer key: planted pairs matched to their true partner, planted
   exclusives left unmatched. Baseline, in its own process where it fits: the same assignment
   (A's decoders carried through the same map vs B's) solved by scipy's dense
   ``linear_sum_assignment`` on the float32 cosine matrix (which it copies to float64: 34 GB at
   65,536², so there the row states the need instead).
2. **Crosscoder from a store larger than memory.** A planted store at d = 512 per model (``full``)
   is written once, then a second store holds its shards repeated as separate files (distinct
   inodes, so nothing is shared in the page cache) until it is larger than the machine's RAM
   (``full``: 1.1 × MemTotal). The same BatchTopK crosscoder (32,768 latents, a fixed number of
   steps) is trained on each in a fresh process. The store is read through
   :meth:`ActivationStore.iter_batches` (memory maps, a shuffle window of 8 shards), so neither
   the anonymous memory nor the resident file pages should depend on the store's size: the
   figure is the ratio of the two runs' peaks (≈ 1 is the goal). VmHWM counts resident
   file-backed pages of the maps too, so RssFile and RssAnon are sampled (every 50 ms) and
   reported beside it; the big store is deleted afterwards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DiffkitError
from .child import run_child
from .machine import LoadSample, MachineInfo, machine_info, max_rss_bytes, sample_load
from .rows import BenchRow, speedup, throughput_ratio

SHARED_FRACTION = 0.9
SAE_JITTER = 0.5        # relative noise on each SAE decoder row: true pairs at cosine ≈ 1 / (1 + 0.5²) = 0.8
PLANTED_K = 32.0
DENSE_GB = lambda n: 8 * n * n / 1e9  # noqa: E731  scipy's float64 copy of an n × n cost matrix


@dataclass(frozen=True)
class AlignSize:
    features: int
    d: int
    dense_baseline: bool    # run scipy's dense solver beside it (only where n² float64 fits)


@dataclass(frozen=True)
class ScaleConfig:
    """What one size of the benchmark runs (saved beside the report as part of ``scale.json``)."""

    size: str
    align: tuple[AlignSize, ...]
    ctx: int = 128
    cc_d: int = 512             # per model
    cc_latents: int = 32_768
    cc_k: int = 32
    cc_batch: int = 2048
    cc_steps: int = 40
    cc_features: int = 4096     # planted features per model in the crosscoder's store
    cc_store_tokens: int = 262_144
    cc_seqs_per_shard: int = 64
    cc_big_repeats: int = 4     # the big store holds the small one's shards this many times...
    cc_big_times_ram: float = 0.0  # ...or enough times to exceed this multiple of MemTotal (> 0 wins)
    lr: float = 3e-4
    seed: int = 0

    def align_tokens(self, d: int) -> int:
        """Enough whole sequences that the train split (9 of every 10) holds ≥ 10·d tokens, the map-fit rule."""
        seqs = math.ceil(10 * d / self.ctx * 10 / 9) + 1
        return seqs * self.ctx


SIZES: dict[str, ScaleConfig] = {
    "small": ScaleConfig("small", (AlignSize(16_384, 1024, True),), cc_d=256, cc_batch=1024, cc_steps=8,
                         cc_features=2048, cc_store_tokens=65_536, cc_seqs_per_shard=32, cc_big_repeats=4),
    "full": ScaleConfig("full", (AlignSize(16_384, 2304, True), AlignSize(65_536, 2304, False)),
                        cc_big_times_ram=1.1),
    # For tests: seconds, not minutes.
    "tiny": ScaleConfig("tiny", (AlignSize(512, 64, True),), ctx=32, cc_d=32, cc_latents=1024, cc_k=8, cc_batch=256,
                        cc_steps=4, cc_features=256, cc_store_tokens=8192, cc_seqs_per_shard=16, cc_big_repeats=3),
}


@dataclass
class AlignRun:
    features: int
    d: int
    tokens: int
    gen_seconds: float          # writing the store and the SAEs (not part of align)
    store_bytes: int
    stages: dict                # seconds: open, load_saes, fit_map, assign, stats, save, total
    peak_rss_bytes: int         # VmHWM of the align process
    peak_anon_bytes: int        # largest sampled RssAnon of the align process
    shared_recovered: float     # planted pairs matched to their true partner
    a_only_found: float         # planted A-only features left unmatched
    b_only_found: float
    shared_lost: float          # planted shared features called A-only (false exclusives)
    counts: dict
    map_fve: float
    total_cost: float
    solver: str
    dense_seconds: float | None = None       # scipy dense: cosine matrix + linear_sum_assignment
    dense_peak_rss_bytes: int | None = None
    dense_total_cost: float | None = None


@dataclass
class CrosscoderRun:
    store_tokens: int
    store_bytes: int
    shards: int
    steps: int
    batch: int
    seconds: float
    tokens_per_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    peak_file_bytes: int
    heldout_fve: dict
    touched_bound_bytes: int    # a/b bytes of the shards the run's windows can touch (window of 8 shards)


@dataclass
class ScaleResult:
    started_utc: str
    size: str
    config: ScaleConfig
    seconds: float
    machine: MachineInfo
    load: list[LoadSample]
    align: list[AlignRun]
    crosscoder: list[CrosscoderRun]
    ram_bytes: int
    command: str
    notes: list[str] = field(default_factory=list)

    @property
    def under_load(self) -> bool:
        return any(s.busy_percent > 30 for s in self.load)


# -- memory sampling (children) -------------------------------------------------------------------
def _status_bytes() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


class StatusSampler:
    """Largest RssAnon / RssFile of this process, sampled every ``interval`` s on a thread (Linux)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            now = _status_bytes()
        except OSError:
            return
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now.get(key, 0))

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self._sample()

    def __enter__(self) -> "StatusSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()
        self._sample()


def _run_child(func: str, spec: dict, threads: int, timeout: float = 3600) -> dict:
    return run_child(f"{__name__}:_child_{func}", spec, f"scale {func}", timeout, threads)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- 1. align -------------------------------------------------------------------------------------
def align_planted_config(features: int, d: int, tokens: int, ctx: int, seed: int = 0):
    from ..synthetic import planted_config

    return planted_config(d=d, superposition=features / d, frac_exclusive=1 - SHARED_FRACTION, n_tokens=tokens,
                          ctx=ctx, k=PLANTED_K, seed=seed)


def _child_generate_align(spec: dict) -> dict:
    from ..synthetic import PlantedStream, write_planted_saes, write_planted_store

    t0 = time.perf_counter()
    cfg = align_planted_config(spec["features"], spec["d"], spec["tokens"], spec["ctx"], spec["seed"])
    stream = PlantedStream(cfg)
    work = Path(spec["work"])
    write_planted_store(stream, work / "store", seqs_per_shard=spec["seqs_per_shard"])
    write_planted_saes(stream, work / "sae_a", work / "sae_b", jitter=SAE_JITTER)
    np.savez(work / "answer.npz", match_a_to_b=stream.match_a_to_b, a_only=stream.a_only, b_only=stream.b_only)
    return {"seconds": time.perf_counter() - t0, "store_bytes": _dir_bytes(work / "store"),
            "peak_rss_bytes": max_rss_bytes()}


def _child_align(spec: dict) -> dict:
    """What ``diffkit align --sae-a W/sae_a --sae-b W/sae_b --acts W/store --out W/diff`` runs, stage by stage."""
    import warnings

    import torch

    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    with StatusSampler() as sampler:
        t = {"start": time.perf_counter()}
        from ..activations import ActivationStore
        from ..diff import AlignConfig, align, save_diff
        from ..linear_map import LinearMap
        from ..saes import load_sae

        t["import"] = time.perf_counter()
        store = ActivationStore.open(work / "store")
        t["open"] = time.perf_counter()
        sae_a, sae_b = load_sae(str(work / "sae_a")), load_sae(str(work / "sae_b"))
        t["load_saes"] = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lmap = LinearMap().fit(store)
            t["fit_map"] = time.perf_counter()
            diff = align(store, sae_a, sae_b, lmap, AlignConfig())
        t["align"] = time.perf_counter()
        lmap.save(work / "diff" / "map")
        save_diff(diff, work / "diff", {"acts": str(work / "store"), "sae_a": str(work / "sae_a"),
                                        "sae_b": str(work / "sae_b"), "map": str(work / "diff" / "map")})
        t["save"] = time.perf_counter()
    asg = diff.assignment
    key = np.load(work / "answer.npz")
    truth = key["match_a_to_b"]
    got = np.full(asg.n_a, -1, dtype=np.int64)
    got[asg.pair_a[asg.matched]] = asg.pair_b[asg.matched]
    shared = truth >= 0
    secs = diff.summary["seconds"]
    stages = {"import": t["import"] - t["start"], "open": t["open"] - t["import"],
              "load_saes": t["load_saes"] - t["open"], "fit_map": t["fit_map"] - t["load_saes"],
              "assign": secs["assign"], "stats": secs["stats"],
              "align_other": (t["align"] - t["fit_map"]) - secs["assign"] - secs["stats"],
              "save": t["save"] - t["align"]}
    stages["total"] = t["save"] - t["start"]
    return {"stages": stages, "peak_rss_bytes": max_rss_bytes(), "peak_anon_bytes": sampler.peak["RssAnon"],
            "shared_recovered": float((got[shared] == truth[shared]).mean()),
            "a_only_found": float(np.isin(key["a_only"], asg.a_only).mean()) if len(key["a_only"]) else 1.0,
            "b_only_found": float(np.isin(key["b_only"], asg.b_only).mean()) if len(key["b_only"]) else 1.0,
            "shared_lost": float((got[shared] == -1).mean()), "counts": diff.summary["counts"],
            "map_fve": float(diff.summary["map"]["scores"]["a_to_b"]["heldout_fve"]),
            "total_cost": float(asg.total_cost), "solver": asg.solver, "tokens": store.n_tokens("all")}


def _child_dense(spec: dict) -> dict:
    """The baseline: A's decoders carried through align's own saved map, cosine matrix, scipy dense assignment."""
    import torch

    from ..diff import DEFAULT_THRESHOLD
    from ..linear_map import LinearMap
    from ..matching import assign_dense, cosine_matrix
    from ..saes import load_sae

    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    sae_a, sae_b = load_sae(str(work / "sae_a")), load_sae(str(work / "sae_b"))
    carried = torch.from_numpy(LinearMap.load(work / "diff" / "map").carry_directions(sae_a.W_dec.double().numpy()))
    dirs_b = sae_b.W_dec.double()
    del sae_a, sae_b
    t0 = time.perf_counter()
    res = assign_dense(cosine_matrix(carried, dirs_b), DEFAULT_THRESHOLD)
    return {"seconds": time.perf_counter() - t0, "peak_rss_bytes": max_rss_bytes(), "total_cost": float(res.total_cost)}


def run_align_case(case: AlignSize, cfg: ScaleConfig, work: Path, threads: int,
                   log: Callable[[str], None]) -> AlignRun:
    work.mkdir(parents=True, exist_ok=True)
    tokens = cfg.align_tokens(case.d)
    spec = {"features": case.features, "d": case.d, "tokens": tokens, "ctx": cfg.ctx, "seed": cfg.seed,
            "work": str(work), "threads": threads, "seqs_per_shard": max(1, (1 << 26) // (cfg.ctx * case.d * 4))}
    log(f"align {case.features:,} features, d {case.d}: writing the planted store ({tokens:,} tokens) and SAEs ...")
    gen = _run_child("generate_align", spec, threads)
    log(f"  {gen['seconds']:.0f} s, store {gen['store_bytes'] / 2**30:.2f} GiB; running align ...")
    res = _run_child("align", spec, threads)
    run = AlignRun(features=case.features, d=case.d, tokens=res["tokens"], gen_seconds=gen["seconds"],
                   store_bytes=gen["store_bytes"], stages=res["stages"], peak_rss_bytes=res["peak_rss_bytes"],
                   peak_anon_bytes=res["peak_anon_bytes"], shared_recovered=res["shared_recovered"],
                   a_only_found=res["a_only_found"], b_only_found=res["b_only_found"],
                   shared_lost=res["shared_lost"], counts=res["counts"], map_fve=res["map_fve"],
                   total_cost=res["total_cost"], solver=res["solver"])
    log(f"  align {run.stages['total']:.1f} s (assign {run.stages['assign']:.1f} s, stats {run.stages['stats']:.1f} s), "
        f"peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB; planted pairs recovered {run.shared_recovered:.1%}, "
        f"exclusives found {run.a_only_found:.1%} / {run.b_only_found:.1%}")
    if case.dense_baseline:
        log(f"  baseline: scipy dense linear_sum_assignment on {case.features:,}² ...")
        dense = _run_child("dense", spec, threads)
        run.dense_seconds, run.dense_peak_rss_bytes = dense["seconds"], dense["peak_rss_bytes"]
        run.dense_total_cost = dense["total_cost"]
        log(f"  {dense['seconds']:.1f} s, peak RSS {dense['peak_rss_bytes'] / 2**30:.2f} GiB")
    shutil.rmtree(work, ignore_errors=True)
    return run


# -- 2. crosscoder ---------------------------------------------------------------------------------
def _child_generate_cc(spec: dict) -> dict:
    from ..synthetic import PlantedStream, planted_config, write_planted_store

    t0 = time.perf_counter()
    cfg = planted_config(d=spec["d"], superposition=spec["features"] / spec["d"], frac_exclusive=0.05,
                         n_tokens=spec["tokens"], ctx=spec["ctx"], k=PLANTED_K, seed=spec["seed"])
    write_planted_store(PlantedStream(cfg), spec["out"], seqs_per_shard=spec["seqs_per_shard"])
    return {"seconds": time.perf_counter() - t0, "peak_rss_bytes": max_rss_bytes()}


def tile_store(src: str | Path, out: str | Path, repeats: int, log: Callable[[str], None] = lambda _: None) -> Path:
    """A store holding ``src``'s shards ``repeats`` times, each a separate copy (no links: distinct pages).

    Sequence numbers continue across the copies; file records (size, sha256) are the source's, so
    ``ActivationStore.open(out, verify="full")`` checks every copy. The manifest is written last.
    """
    from ..progress import tqdm

    from ..activations import finish_manifest
    from ..store_format import read_manifest, shard_files, write_manifest

    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    if out.exists() and any(out.iterdir()):
        raise DiffkitError(f"{out} exists and is not empty: choose a new directory for the tiled store")
    shards = manifest["shards"]
    n_seqs = sum(s["n_seqs"] for s in shards)
    new = []
    for r in tqdm(range(repeats), desc="tile store", unit="copy", disable=repeats < 4):
        for s in shards:
            index = r * len(shards) + s["index"]
            names_old, names_new = shard_files(s["index"]), shard_files(index)
            files = {}
            for key, rel in names_old.items():
                dst = out / names_new[key]
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, dst.with_name(dst.name + ".tmp"))
                os.replace(dst.with_name(dst.name + ".tmp"), dst)
                files[names_new[key]] = s["files"][rel]
            new.append({**s, "index": index, "seq_start": r * n_seqs + s["seq_start"], "files": files})
        log(f"  copy {r + 1}/{repeats}")
    manifest["shards"] = new
    manifest["config"]["tokens"] = manifest["config"]["tokens"] * repeats
    manifest["tiled_from"] = {"store": str(src), "repeats": repeats}
    d = {src_: int(manifest["sources"][src_]["d_model"]) for src_ in ("a", "b")}
    finish_manifest(manifest, d)
    write_manifest(out, manifest)
    return out


def _child_crosscoder(spec: dict) -> dict:
    import torch

    from baselines.crosscoder.train import TrainConfig, train

    torch.set_num_threads(spec["threads"])
    with StatusSampler() as sampler:
        cfg = TrainConfig(acts=spec["store"], out=spec["out"], dict_size=spec["latents"], k=spec["k"],
                          batch_size=spec["batch"], tokens=spec["batch"] * spec["steps"], lr=spec["lr"],
                          seed=spec["seed"], checkpoint_every=0, eval_tokens=spec["batch"], log_every=spec["steps"])
        summary = train(cfg, progress=False, threads=spec["threads"], log=lambda _: None)
    last = summary["last_train_log"]
    return {"seconds": float(last["elapsed_s"]), "tokens_per_s": float(last["tokens_per_s"]),
            "steps": summary["steps"], "peak_rss_bytes": max_rss_bytes(), "peak_anon_bytes": sampler.peak["RssAnon"],
            "peak_file_bytes": sampler.peak["RssFile"],
            "heldout_fve": {k: v for k, v in summary["heldout"].items() if k.startswith("fve_")}}


def _touched_bound(store_dir: Path, batch: int, steps: int, window: int = 8) -> int:
    """Bytes (a and b files) of the shards a run of ``steps`` batches can touch: whole windows of ``window`` shards."""
    manifest = json.loads((store_dir / "manifest.json").read_text())
    shards = manifest["shards"]
    per_shard = [sum(f["bytes"] for rel, f in s["files"].items() if not rel.startswith("tokens/")) for s in shards]
    train_per_shard = max(1, min(s["n_train"] for s in shards))
    windows = math.ceil(batch * steps / (window * train_per_shard)) + 1  # a batch may straddle two windows
    return min(sum(per_shard), windows * window * max(per_shard))


def run_crosscoder_cases(cfg: ScaleConfig, work: Path, threads: int, log: Callable[[str], None],
                         ram_bytes: int) -> list[CrosscoderRun]:
    work.mkdir(parents=True, exist_ok=True)
    small = work / "store-small"
    spec = {"d": cfg.cc_d, "features": cfg.cc_features, "tokens": cfg.cc_store_tokens, "ctx": cfg.ctx,
            "seed": cfg.seed, "out": str(small), "seqs_per_shard": cfg.cc_seqs_per_shard}
    log(f"crosscoder: writing a planted store of {cfg.cc_store_tokens:,} tokens at d {cfg.cc_d} + {cfg.cc_d} ...")
    _run_child("generate_cc", spec, threads)
    small_bytes = _dir_bytes(small)
    repeats = cfg.cc_big_repeats
    if cfg.cc_big_times_ram > 0:
        repeats = max(2, math.ceil(cfg.cc_big_times_ram * ram_bytes / small_bytes))
    free = shutil.disk_usage(work).free
    if repeats * small_bytes > free - (4 << 30):
        raise DiffkitError(f"the big store needs {repeats * small_bytes / 2**30:.1f} GiB and {work} has "
                           f"{free / 2**30:.1f} GiB free (keeping 4 GiB): free disk space or pass another --work")
    big = work / "store-big"
    log(f"  {small_bytes / 2**30:.2f} GiB; tiling it {repeats}× into a {repeats * small_bytes / 2**30:.1f} GiB store "
        f"(RAM {ram_bytes / 2**30:.1f} GiB) ...")
    t0 = time.perf_counter()
    tile_store(small, big, repeats)  # its own progress bar (stderr) when there are many copies
    os.sync()
    log(f"  written in {time.perf_counter() - t0:.0f} s")
    runs = []
    try:
        for store in (small, big):
            n_shards = len(json.loads((store / "manifest.json").read_text())["shards"])
            log(f"  training {cfg.cc_latents:,} latents, {cfg.cc_steps} steps of {cfg.cc_batch} on {store.name} ...")
            res = _run_child("crosscoder", {"store": str(store), "out": str(work / f"cc-{store.name}"),
                                            "latents": cfg.cc_latents, "k": cfg.cc_k, "batch": cfg.cc_batch,
                                            "steps": cfg.cc_steps, "lr": cfg.lr, "seed": cfg.seed,
                                            "threads": threads}, threads)
            manifest = json.loads((store / "manifest.json").read_text())
            runs.append(CrosscoderRun(
                store_tokens=int(manifest["n_tokens"]["all"]), store_bytes=_dir_bytes(store), shards=n_shards,
                steps=res["steps"], batch=cfg.cc_batch, seconds=res["seconds"], tokens_per_s=res["tokens_per_s"],
                peak_rss_bytes=res["peak_rss_bytes"], peak_anon_bytes=res["peak_anon_bytes"],
                peak_file_bytes=res["peak_file_bytes"], heldout_fve=res["heldout_fve"],
                touched_bound_bytes=_touched_bound(store, cfg.cc_batch, cfg.cc_steps)))
            r = runs[-1]
            log(f"    {r.tokens_per_s:,.0f} tok/s, VmHWM {r.peak_rss_bytes / 2**30:.2f} GiB, RssAnon "
                f"{r.peak_anon_bytes / 2**30:.2f} GiB, RssFile {r.peak_file_bytes / 2**30:.2f} GiB")
            shutil.rmtree(work / f"cc-{store.name}", ignore_errors=True)
    finally:
        shutil.rmtree(big, ignore_errors=True)
        shutil.rmtree(small, ignore_errors=True)
    return runs


# -- the benchmark ----------------------------------------------------------------------------------
def run_scale_benchmark(size: str, work: str | Path, threads: int = 2, log: Callable[[str], None] = print,
                        command: str | None = None) -> tuple[ScaleResult, list[BenchRow]]:
    """Run ``size`` ("small", "full" or "tiny") in ``work`` (filled, then emptied); return the result and its rows."""
    import psutil

    if size not in SIZES:
        raise DiffkitError(f"unknown scale benchmark size {size!r}: use one of {', '.join(SIZES)}")
    if threads < 1:
        raise DiffkitError(f"--threads must be positive, got {threads}")
    cfg = SIZES[size]
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = [sample_load("before", 2.0)]
    ram = psutil.virtual_memory().total
    aligns = [run_align_case(case, cfg, work / f"align-{case.features}", threads, log) for case in cfg.align]
    ccs = run_crosscoder_cases(cfg, work / "crosscoder", threads, log, ram)
    load.append(sample_load("after", 2.0))
    command = command or ("diffkit bench scale" + (" --full" if size == "full" else "") +
                          (f" --threads {threads}" if threads != 2 else ""))
    result = ScaleResult(started, size, cfg, time.time() - t0, machine_info(threads), load, aligns, ccs, ram, command)
    return result, scale_rows(result)


def scale_rows(result: ScaleResult) -> list[BenchRow]:
    rows = []
    for a in result.align:
        case = f"{a.features:,} features, d {a.d}"
        if a.dense_seconds is not None:
            rows.append(BenchRow("scale", f"align assignment stage, {case}", a.stages["assign"], "s",
                                 "scipy dense linear_sum_assignment (same carried directions, cosine matrix included)",
                                 a.dense_seconds, speedup(a.stages["assign"], a.dense_seconds), a.peak_rss_bytes,
                                 note=f"total cost {a.total_cost:,.3f} vs dense {a.dense_total_cost:,.3f}; dense peak "
                                      f"RSS {a.dense_peak_rss_bytes / 2**30:.2f} GiB"))
        else:
            rows.append(BenchRow("scale", f"align assignment stage, {case}", a.stages["assign"], "s",
                                 f"scipy dense: would need {DENSE_GB(a.features):.0f} GB (float64 n² copy)", None, None,
                                 a.peak_rss_bytes, note="dense not run: does not fit in memory"))
        rows.append(BenchRow("scale", f"diffkit align end to end, {case}, {a.tokens:,} tokens", a.stages["total"], "s",
                             peak_rss_bytes=a.peak_rss_bytes,
                             note="stages: " + ", ".join(f"{k} {v:.1f}" for k, v in a.stages.items() if k != "total")))
        rows.append(BenchRow("scale", f"align recovers the planted answer, {case}", a.shared_recovered, "fraction",
                             peak_rss_bytes=a.peak_rss_bytes,
                             note=f"planted pairs matched to their partner; exclusives found A {a.a_only_found:.3f} / "
                                  f"B {a.b_only_found:.3f}"))
    if len(result.crosscoder) == 2:
        s, b = result.crosscoder
        case = (f"crosscoder {result.config.cc_latents:,} latents, d {result.config.cc_d}+{result.config.cc_d}, "
                f"store {b.store_bytes / 2**30:.1f} GiB vs {s.store_bytes / 2**30:.1f} GiB")
        rows.append(BenchRow("scale", f"{case}: peak RSS (VmHWM)", b.peak_rss_bytes / 2**30, "GiB",
                             f"the same run on the {s.store_bytes / 2**30:.1f} GiB store", s.peak_rss_bytes / 2**30,
                             s.peak_rss_bytes / b.peak_rss_bytes, b.peak_rss_bytes,
                             note="ratio = small-store peak / big-store peak: 1 = memory does not grow with the store"))
        rows.append(BenchRow("scale", f"{case}: peak anonymous memory (RssAnon, sampled)", b.peak_anon_bytes / 2**30,
                             "GiB", f"the same run on the {s.store_bytes / 2**30:.1f} GiB store",
                             s.peak_anon_bytes / 2**30, s.peak_anon_bytes / max(1, b.peak_anon_bytes), b.peak_rss_bytes))
        rows.append(BenchRow("scale", f"{case}: training rate", b.tokens_per_s, "tokens/s",
                             f"the same run on the {s.store_bytes / 2**30:.1f} GiB store", s.tokens_per_s,
                             throughput_ratio(b.tokens_per_s, s.tokens_per_s), b.peak_rss_bytes))
    return rows


def summary_rows(size: str, work: Path, threads: int, log: Callable[[str], None]) -> list[BenchRow]:
    """The contract of ``diffkit bench all``: run ``size`` in ``work``, write nothing under reports/, return rows."""
    return run_scale_benchmark(size, work, threads, log)[1]


def result_to_json(result: ScaleResult, rows: list[BenchRow]) -> dict:
    return {"kind": "diffkit.bench.scale", "command": result.command, "started_utc": result.started_utc,
            "size": result.size, "seconds": result.seconds, "config": asdict(result.config),
            "machine": asdict(result.machine), "load": [asdict(s) for s in result.load], "ram_bytes": result.ram_bytes,
            "align": [asdict(a) for a in result.align], "crosscoder": [asdict(c) for c in result.crosscoder],
            "rows": [r.to_dict() for r in rows]}
