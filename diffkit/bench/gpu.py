"""``diffkit bench gpu``: the CUDA paths measured for real, against the card's own matmul rate.

What runs where a GPU is present (the CPU benchmarks cannot show these paths):

1. **Matmul rate** of this card, measured in the same run: an 8192³ product in bf16, in fp32 with
   TF32 off and with TF32 on, and the crosscoder encoder's own shape in bf16 (best of 10).
2. **Crosscoder training** (``baselines.crosscoder.train.train``, the code ``diffkit crosscoder
   train --device cuda`` runs) on a planted store of SmolLM2-135M's width (d = 576 per model):
   tokens/s after warm-up for the sparse and dense BatchTopK paths, bf16 autocast and fp32, and
   ``torch.compile``; achieved rate counted as ``12·L·D`` FLOPs per token (as in the CPU
   benchmark) against the bf16 matmul rate; peak GPU memory. Then two longer runs (bf16 and
   fp32) give held-out FVE, so the precision's effect on quality is visible beside its speed.
3. **Assignment**: the GPU candidate search (fp16 top-k by chunked matmul) of ``diffkit align``
   at 16,384 and 65,536 features (d = 2304), against the same code on this machine's CPUs and
   scipy's dense solver (16k), with the fraction of the planted pairs recovered.

Each section is written to ``gpu.json`` as soon as it ends, so a run cut short keeps what it
measured. ``--deadline`` skips the optional rows (compile, the 65k CPU baseline) when time runs out.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

COMMAND = "diffkit bench gpu"
D_MODEL = 576                # SmolLM2-135M's residual width
ALIGN_D = 2304               # gemma-2-2b's residual width (the scale issue's figure)
BATCH = 4096


def _timed_cuda(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs, each bracketed by CUDA synchronisation."""
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def cuda_matmul_rates(d_in: int, dict_size: int) -> dict[str, float]:
    """TFLOP/s of ``torch.mm`` on this card: 8192³ in bf16 / fp32 / TF32, and the encoder shape in bf16."""
    import torch

    out = {}
    shapes = {"8192³ bf16": (8192, 8192, 8192, torch.bfloat16, False),
              "8192³ fp32 (TF32 off)": (8192, 8192, 8192, torch.float32, False),
              "8192³ fp32 (TF32 on)": (8192, 8192, 8192, torch.float32, True),
              f"encoder {BATCH}×{d_in} @ {d_in}×{dict_size} bf16": (BATCH, d_in, dict_size, torch.bfloat16, False)}
    for name, (m, k, n, dtype, tf32) in shapes.items():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        b = torch.randn(k, n, device="cuda", dtype=dtype)
        out[name] = 2 * m * k * n / _timed_cuda(lambda: a @ b, 10) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def planted_store(work: Path, n_tokens: int) -> tuple[str, dict]:
    """A planted pair at d = 576 written as an ActivationStore (the format ``diffkit collect`` writes)."""
    from dataclasses import asdict

    from diffkit.synthetic import PlantedConfig, make_planted, write_planted_store

    cfg = PlantedConfig(d_a=D_MODEL, d_b=D_MODEL, n_shared=2048, n_a_only=256, n_b_only=256, k=32,
                        n_tokens=n_tokens, ctx=128, noise=0.05, seed=0)
    path = work / "store"
    write_planted_store(make_planted(cfg), path)
    return str(path), asdict(cfg)


def train_row(store: str, work: Path, dict_size: int, steps: int, *, sparse: bool, autocast: bool,
              compile_: bool = False, lr: float = 1e-4, k: int = 32, log_every: int = 10,
              device: str = "cuda", prefetch: int = 2) -> dict:
    """One ``train()`` run: tokens/s after the warm-up logs, peak GPU memory, held-out FVE."""
    import torch

    from baselines.crosscoder.train import TrainConfig, train

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = Path(tempfile.mkdtemp(dir=work))
    cfg = TrainConfig(acts=store, out=str(out), dict_size=dict_size, k=k, batch_size=BATCH, tokens=BATCH * steps,
                      lr=lr, log_every=log_every, checkpoint_every=0, eval_tokens=BATCH * 8, sparse=sparse,
                      autocast=autocast, compile=compile_, device=device,
                      prefetch=prefetch)
    t0 = time.time()
    summary = train(cfg, progress=False, log=lambda _: None)
    wall = time.time() - t0
    logs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in logs if r["split"] == "train"]
    warm, last = logs[min(2, len(logs) - 2)], logs[-1]  # after compile / allocator warm-up
    tps = (last["tokens"] - warm["tokens"]) / (last["elapsed_s"] - warm["elapsed_s"])
    return {"dict_size": dict_size, "path": "sparse" if sparse else "dense",
            "precision": "bf16 autocast" if autocast else "fp32", "compile": compile_, "prefetch": prefetch,
            "steps": steps,
            "tokens_per_s": tps, "flops_per_token": 12.0 * dict_size * 2 * D_MODEL,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0, "wall_s": wall, "heldout": summary["heldout"],
            "dead_frac": last["dead_frac"]}


def align_row(n: int, method: str, device: str, threads: int) -> dict:
    """One assignment of ``n`` planted directions (d = 2304): seconds, planted pairs recovered."""
    import numpy as np
    import torch

    from ..matching import assign, assign_dense, cosine_matrix
    from .align import planted_directions

    torch.set_num_threads(threads)
    dirs_a, dirs_b, truth = planted_directions(n, ALIGN_D, 0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if method == "sparse":
        res = assign(dirs_a, dirs_b, 0.5, solver="sparse", k=32, device=device)
    else:
        res = assign_dense(cosine_matrix(dirs_a, dirs_b), 0.5)
    seconds = time.perf_counter() - t0
    got = np.full(n, -1)
    got[res.pair_a[res.matched]] = res.pair_b[res.matched]
    shared = truth >= 0
    return {"n": n, "method": method, "device": device, "threads": threads, "seconds": seconds,
            "stages": res.seconds, "shared_recovered": float((got[shared] == truth[shared]).mean()),
            "a_only_unmatched": float((got[~shared] == -1).mean()), "total_cost": float(res.total_cost),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else 0}


def run_gpu_benchmark(out: Path, quick: bool = False, deadline_s: float = 480.0, align: bool = True,
                      log: Callable[[str], None] = print) -> dict:
    """Run every section; write ``out/gpu.json`` after each one and return the result."""
    import os
    import platform

    import torch

    from diffkit.errors import DiffkitError

    if not torch.cuda.is_available():
        raise DiffkitError("diffkit bench gpu needs a CUDA device and this machine has none: run it on a GPU machine")
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    result: dict = {"command": COMMAND + (" --quick" if quick else ""),
                    "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "device": {"name": props.name, "memory_gib": props.total_memory / 2**30,
                               "multiprocessors": props.multi_processor_count, "torch": torch.__version__,
                               "cuda": torch.version.cuda, "cpus": os.cpu_count(), "python": platform.python_version()},
                    "matmul_tflops": {}, "train": [], "fve": [], "align": [], "errors": [], "skipped": []}

    def save() -> None:
        result["seconds"] = time.time() - t_start
        (out / "gpu.json").write_text(json.dumps(result, indent=1))

    def left() -> float:
        return deadline_s - (time.time() - t_start)

    def attempt(section: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a benchmark row that fails is a finding to report, not a reason to stop
            result["errors"].append(f"{section}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            log(f"  {section} FAILED: {result['errors'][-1]}")
            return None
        finally:
            save()

    sizes = (8192,) if quick else (16384, 32768)
    log("matmul rates ...")
    result["matmul_tflops"] = attempt("matmul", lambda: cuda_matmul_rates(2 * D_MODEL, max(sizes))) or {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log("planted store ...")
        t = time.time()
        made = attempt("store", lambda: planted_store(work, 32_768 if quick else 131_072))
        if made is None:
            return result
        store, result["store"] = made
        result["store_seconds"] = time.time() - t
        steps = 30 if quick else 120
        rows = [(L, sparse, ac, False, 2) for L in sizes for sparse in (True, False) for ac in (True, False)]
        rows += [(max(sizes), True, ac, False, 0) for ac in (True, False)]  # the same without prefetching
        rows.append((max(sizes), False, True, True, 2))  # torch.compile on the dense bf16 path
        for L, sparse, ac, comp, pre in rows:
            if comp and left() < 200:
                result["skipped"].append(f"compile row (L={L}): {left():.0f} s left")
                continue
            log(f"train L={L} {'sparse' if sparse else 'dense'} {'bf16' if ac else 'fp32'} prefetch {pre}"
                f"{' compile' if comp else ''}")
            row = attempt(f"train L={L}", lambda: train_row(store, work, L, steps, sparse=sparse, autocast=ac,
                                                           compile_=comp, prefetch=pre))
            if row:
                result["train"].append(row)
                log(f"  {row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_gpu_bytes'] / 2**30:.1f} GiB")
        fve_steps = 60 if quick else 1000
        for ac in (True, False):
            log(f"FVE run L={sizes[0]} {'bf16' if ac else 'fp32'} ({fve_steps} steps)")
            row = attempt("fve", lambda: train_row(store, work, sizes[0], fve_steps, sparse=True, autocast=ac,
                                                   lr=1e-3, log_every=50))
            if row:
                result["fve"].append(row)
                log(f"  FVE {row['heldout'].get('fve_a', float('nan')):.3f} / "
                    f"{row['heldout'].get('fve_b', float('nan')):.3f} in {row['wall_s']:.0f} s")
    ns = () if not align else (4096,) if quick else (16384, 65536)
    cpus = os.cpu_count() or 1
    for n in ns:
        cases = [("sparse", "cuda"), ("sparse", "cpu")] + ([("dense", "cpu")] if n <= 16384 else [])
        for method, device in cases:
            if device == "cpu" and n > 16384 and left() < 150:
                result["skipped"].append(f"align n={n} cpu: {left():.0f} s left")
                continue
            log(f"align n={n} {method} {device}")
            row = attempt(f"align n={n} {method} {device}", lambda: align_row(n, method, device, cpus))
            if row:
                result["align"].append(row)
                log(f"  {row['seconds']:.1f} s, shared recovered {row['shared_recovered']:.4f}")
    save()
    return result


# -- rows for ``diffkit bench all`` ----------------------------------------------------------------

def gpu_rows(r: dict) -> list:
    """BenchRows from a ``gpu.json`` result (this run's, or the last committed one), device = the card's name."""
    from .rows import BenchRow, speedup, throughput_ratio

    dev = r["device"]["name"]
    rows = [BenchRow("gpu", f"matmul {name}", rate * 1e3, "GFLOP/s", device=dev, note="reference, same run")
            for name, rate in r.get("matmul_tflops", {}).items()]
    bf16 = r.get("matmul_tflops", {}).get("8192³ bf16")
    train = r.get("train", [])
    for t in train:
        if t["compile"] or t["prefetch"] == 0:
            continue
        case = f"crosscoder training L={t['dict_size']:,}, {t['path']} path, {t['precision']}"
        flat = next((u for u in train if u["dict_size"] == t["dict_size"] and u["precision"] == t["precision"]
                     and u["path"] == t["path"] and u["prefetch"] == 0 and not u["compile"]), None)
        dense = next((u for u in train if u["dict_size"] == t["dict_size"] and u["precision"] == t["precision"]
                      and u["path"] == "dense" and u["prefetch"] == t["prefetch"] and not u["compile"]), None)
        if t["path"] == "sparse" and dense is not None:
            rows.append(BenchRow("gpu", case, t["tokens_per_s"], "tokens/s", "dense path (plain autograd), same run",
                                 dense["tokens_per_s"], throughput_ratio(t["tokens_per_s"], dense["tokens_per_s"]),
                                 None, dev, f"peak GPU memory {t['peak_gpu_bytes'] / 2**30:.1f} GiB"))
        if flat is not None:
            rows.append(BenchRow("gpu", case, t["tokens_per_s"], "tokens/s", "the same without --prefetch",
                                 flat["tokens_per_s"], throughput_ratio(t["tokens_per_s"], flat["tokens_per_s"]),
                                 None, dev, f"peak GPU memory {t['peak_gpu_bytes'] / 2**30:.1f} GiB"))
        if bf16 and t["path"] == "sparse" and t["precision"].startswith("bf16"):
            counted = t["tokens_per_s"] * t["flops_per_token"] / 1e9
            rows.append(BenchRow("gpu", f"counted rate 12·L·D, {case}", counted, "GFLOP/s",
                                 "bf16 matmul rate of the card, same run", bf16 * 1e3,
                                 throughput_ratio(counted, bf16 * 1e3), None, dev, "latency-bound at this size"))
    fve = {f["precision"]: f for f in r.get("fve", [])}
    if "bf16 autocast" in fve and "fp32" in fve:
        b, f = fve["bf16 autocast"], fve["fp32"]
        rows.append(BenchRow("gpu", f"crosscoder L={b['dict_size']:,}, {b['steps'] * BATCH:,} tokens: held-out FVE A, "
                             "bf16 autocast", b["heldout"]["fve_a"], "FVE", "the same in fp32", f["heldout"]["fve_a"],
                             throughput_ratio(b["heldout"]["fve_a"], f["heldout"]["fve_a"]), None, dev,
                             f"wall {b['wall_s']:.0f} s vs {f['wall_s']:.0f} s"))
    align = r.get("align", [])
    for a in align:
        if a["device"] != "cuda":
            continue
        for base in (u for u in align if u["n"] == a["n"] and u["device"] == "cpu"):
            label = ("same code on the CPU" if base["method"] == "sparse" else "scipy dense on the CPU") + \
                f" ({base['threads']} threads)"
            rows.append(BenchRow("gpu", f"assignment, {a['n']:,} planted features, d {ALIGN_D}", a["seconds"], "s",
                                 label, base["seconds"], speedup(a["seconds"], base["seconds"]), None, dev,
                                 f"planted pairs recovered {a['shared_recovered']:.2%}"))
    return rows


def summary_rows(size: str, work: Path, threads: int, log: Callable[[str], None]) -> list:
    """The ``gpu`` part of ``diffkit bench all --full`` (CUDA machines only): :func:`run_gpu_benchmark`'s rows."""
    result = run_gpu_benchmark(Path(work), quick=size != "full", log=log)
    if result.get("errors"):
        log("  rows that failed: " + "; ".join(result["errors"]))
    return gpu_rows(result)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--deadline", type=float, default=480.0)
    parser.add_argument("--no-align", action="store_true")
    args = parser.parse_args()
    run_gpu_benchmark(args.out, args.quick, args.deadline, align=not args.no_align)


def format_gpu_report(r: dict) -> str:
    """Markdown for ``reports/benchmarks/gpu.md`` from a ``gpu.json`` result (and its ``notes``)."""
    dev = r["device"]
    rate = r["matmul_tflops"].get("8192³ bf16", float("nan"))
    lines = [f"<!-- Generated by: {r['command']} (on a GPU machine; figures from {dev['name']}) -->",
             f"# Benchmark: the CUDA paths on an {dev['name']}", "",
             f"Run {r['started_utc']}, {r['seconds']:.0f} s. Regenerate on a GPU machine with `{r['command']}`. "
             f"Device: {dev['name']}, {dev['memory_gib']:.0f} GiB, {dev['multiprocessors']} SMs, torch "
             f"{dev['torch']} (CUDA {dev['cuda']}), {dev['cpus']} CPU cores, Python {dev['python']}. These figures "
             "are from that machine only; the CPU benchmarks beside this file are from the 2-core CPU machine.", "",
             "## Matmul rate of this card (the reference, same run)", "", "| product | TFLOP/s |", "|---|---:|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in r["matmul_tflops"].items()]
    s = r.get("store", {})
    lines += ["", "## Crosscoder training (`train()`, the code of `diffkit crosscoder train --device cuda`)", "",
              f"Planted store: d = {s.get('d_a')} per model (SmolLM2-135M's width), {s.get('n_tokens', 0):,} tokens, "
              f"{s.get('n_shared')} shared + {s.get('n_a_only')} / {s.get('n_b_only')} exclusive features, k = "
              f"{s.get('k')}; BatchTopK k = 32, batch {BATCH}. tokens/s over the logged steps after the first two "
              "logs (warm-up); counted FLOPs = 12·L·D per token (D = 1152), as in the CPU benchmark, against the "
              f"card's bf16 rate ({rate:,.0f} TFLOP/s). Peak = `torch.cuda.max_memory_allocated`.", "",
              "| L | path | precision | prefetch | tokens/s | counted TFLOP/s | % of bf16 rate | peak GPU memory |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for t in r["train"]:
        tf = t["tokens_per_s"] * t["flops_per_token"] / 1e12
        lines.append(f"| {t['dict_size']:,} | {t['path']}{' + compile' if t['compile'] else ''} | {t['precision']} | "
                     f"{t['prefetch']} | {t['tokens_per_s']:,.0f} | {tf:,.1f} | {100 * tf / rate:.1f}% | "
                     f"{t['peak_gpu_bytes'] / 2**30:.1f} GiB |")
    if r["fve"]:
        lines += ["", "Quality is the same in bf16 and fp32 (same seed, store and schedule; lr 1e-3):", "",
                  "| L | precision | steps | tokens | held-out FVE A / B | L0 | wall time | tokens/s |",
                  "|---:|---|---:|---:|---|---:|---:|---:|"]
        for t in r["fve"]:
            h = t["heldout"]
            lines.append(f"| {t['dict_size']:,} | {t['precision']} | {t['steps']} | {t['steps'] * BATCH:,} | "
                         f"{h['fve_a']:.3f} / {h['fve_b']:.3f} | {h['l0']:.1f} | {t['wall_s']:.0f} s | "
                         f"{t['tokens_per_s']:,.0f} |")
    if r["align"]:
        lines += ["", f"## Assignment (`diffkit align`'s sparse solver), planted directions, d = {ALIGN_D}", "",
                  "Half the rows of A are noisy copies of B's rows (the planted pairs), the rest random; cosine cost, "
                  "threshold 0.5, top-32 candidates each way. *candidates* is the top-k search (fp16 matmul on CUDA, "
                  "bf16 on CPU), *assign* the sparse matching (scipy, on the CPU in both cases).", "",
                  "| features | method | device | wall time | candidates | assign | planted pairs recovered | peak GPU memory |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        for a in r["align"]:
            st = a["stages"]
            lines.append(f"| {a['n']:,} | {'sparse candidate graph' if a['method'] == 'sparse' else 'scipy dense'} | "
                         f"{a['device']}{' (' + str(a['threads']) + ' threads)' if a['device'] == 'cpu' else ''} | "
                         f"{a['seconds']:.1f} s | {st.get('candidates', 0):.1f} s | {st.get('assign', 0):.1f} s | "
                         f"{100 * a['shared_recovered']:.2f}% | {a['peak_gpu_bytes'] / 2**30:.1f} GiB |")
    for title, items in (("Rows that failed", r["errors"]), ("Rows skipped for time", r["skipped"])):
        if items:
            lines += ["", f"{title}:", ""] + [f"- {e}" for e in items]
    if r.get("notes"):
        lines += ["", "## What these runs found", ""] + list(r["notes"])
    return "\n".join(lines) + "\n"


def write_gpu_report(result: dict, out: Path) -> Path:
    """``out`` (markdown) and ``out`` with ``.json`` beside it, atomically."""
    from diffkit.io import atomic_write_bytes

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(result, indent=1).encode())
    atomic_write_bytes(out, format_gpu_report(result).encode())
    return out
