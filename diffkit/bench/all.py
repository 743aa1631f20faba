"""``diffkit bench all``: every benchmark of the project, one report (``reports/benchmarks/README.md``).

Each part is a function ``summary_rows(size, work, threads, log) -> list[BenchRow]`` named in
:data:`REGISTRY` as ``"module:function"``. Every part runs in its own fresh process (so its peak
RSS, VmHWM, is its own and a crash or a leak cannot touch the next part), with its own temporary
``work`` directory, timed by the parent. A part that fails, runs over its time limit, or does not
exist yet (its module or its ``summary_rows`` is missing) is recorded as such in the report; the
others still run and the command ends with a non-zero status.

Sizes: ``small`` fits the whole run in about 10 minutes on a 2-core CPU machine (each part's
share is :data:`BUDGET_S`); ``full`` runs each part at the size of its own command, and on a CUDA
machine also the GPU benchmark. Without CUDA the report's GPU section shows the figures of the
committed ``gpu.json`` beside the report, labelled with their device and date, never mixed with
this run's rows.

The parent writes ``summary.json`` (everything the report shows) and the markdown renders from it
alone (:mod:`diffkit.bench.summary_report`), so a report can be re-rendered without re-running.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..errors import DiffkitError
from ..io import atomic_write_json
from .rows import BenchRow

SUMMARY_KIND = "diffkit.bench.summary"
SUMMARY_FORMAT_VERSION = 1
SIZES = ("small", "full")

# (part name, "module:function"). Order = run order: cheap reference first, then the stages.
REGISTRY: tuple[tuple[str, str], ...] = (
    ("matmul", "diffkit.bench.baselines:summary_rows"),
    ("collect", "diffkit.bench.collect:summary_rows"),
    ("align", "diffkit.bench.align:summary_rows"),
    ("mapfit", "diffkit.bench.align:map_fit_summary_rows"),
    ("crosscoder", "baselines.crosscoder.bench:summary_rows"),
    ("scale", "diffkit.bench.scale:summary_rows"),
    ("soak", "diffkit.bench.soak:summary_rows"),
    ("gpu", "diffkit.bench.gpu:summary_rows"),
)
GPU_PARTS = ("gpu",)  # run only with --full on a machine with CUDA
# Seconds each part may take at size "small" on the 2-core machine (the whole run: <= 600 s).
BUDGET_S = {"matmul": 20, "collect": 60, "align": 60, "mapfit": 45, "crosscoder": 90, "scale": 150, "soak": 120}
TOTAL_BUDGET_S = 600
TIMEOUT_S = {"small": 900, "full": 4 * 3600}  # a part running longer is stopped and recorded as failed
# Detailed reports, relative to reports/benchmarks/ (linked where the file exists).
DETAIL_REPORTS = {"collect": "collect.md", "align": "align.md", "mapfit": "align.md", "crosscoder": "crosscoder.md",
                  "scale": "scale.md", "soak": "soak.md", "gpu": "gpu.md"}
OTHER_REPORTS = {"planted ground truth (accuracy of both methods; `diffkit bench groundtruth`)":
                 "../groundtruth/report.md"}
GPU_REFERENCE = "gpu.json"  # beside the report: the last GPU run's figures


class MissingPart(DiffkitError):
    """A registered part whose module or summary function does not exist (yet)."""


@dataclass(frozen=True)
class AllConfig:
    """Options of one ``diffkit bench all`` run (saved in summary.json)."""

    size: str = "small"
    threads: int = 2
    only: tuple[str, ...] = ()
    out: str = "reports/benchmarks/README.md"

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise DiffkitError(f"unknown size {self.size!r}: use one of {', '.join(SIZES)}")
        if self.threads <= 0:
            raise DiffkitError(f"--threads must be positive, got {self.threads}")
        names = [name for name, _ in REGISTRY]
        unknown = [n for n in self.only if n not in names]
        if unknown:
            raise DiffkitError(f"--only: unknown part(s) {', '.join(unknown)}: choose from {', '.join(names)}")

    @property
    def command(self) -> str:
        parts = ["diffkit bench all"] + (["--full"] if self.size == "full" else [])
        if self.threads != 2:
            parts.append(f"--threads {self.threads}")
        if self.out != AllConfig.out:
            parts.append(f"--out {self.out}")
        if self.only:
            parts.append(f"--only {','.join(self.only)}")
        return " ".join(parts)


@dataclass
class PartResult:
    name: str
    target: str
    status: str                    # ok | failed | missing | not run
    seconds: float = 0.0
    peak_rss_bytes: int | None = None  # VmHWM of the part's process (its own subprocesses report per row)
    message: str = ""
    rows: list[BenchRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        return d


def resolve(target: str) -> Callable[..., list[BenchRow]]:
    """The function named by ``"module:function"``; :class:`MissingPart` where the module or function is absent."""
    module, _, func = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise MissingPart(f"module {module} does not exist yet: its engineer has not added it") from None
        raise
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise MissingPart(f"{module} has no {func}() yet: add summary_rows(size, work, threads, log) -> "
                          "list[BenchRow] to it")
    return fn


# -- the child: one part in its own process -----------------------------------------------------

def run_part_here(target: str, size: str, work: Path, threads: int,
                  log: Callable[[str], None] = lambda _: None) -> list[BenchRow]:
    """Run one part in this process and check what it returns (the child's body; tests call it directly)."""
    import torch

    torch.set_num_threads(threads)
    Path(work).mkdir(parents=True, exist_ok=True)
    rows = resolve(target)(size, Path(work), threads, log)
    if not isinstance(rows, list) or not all(isinstance(r, BenchRow) for r in rows):
        raise DiffkitError(f"{target} returned {type(rows).__name__}, not a list of BenchRow")
    if not rows:
        raise DiffkitError(f"{target} returned no rows")
    return rows


def _child_main(spec_json: str) -> None:
    """Entry point of a part's process: run it, write ``spec["result"]`` (rows or the error) atomically."""
    from .machine import max_rss_bytes

    spec = json.loads(spec_json)
    result: dict[str, Any] = {"status": "ok"}
    try:
        rows = run_part_here(spec["target"], spec["size"], Path(spec["work"]), spec["threads"],
                             lambda m: print(m, file=sys.stderr, flush=True))
        result["rows"] = [r.to_dict() for r in rows]
    except MissingPart as exc:
        result = {"status": "missing", "message": str(exc)}
    except DiffkitError as exc:
        result = {"status": "failed", "message": str(exc)}
    except Exception as exc:  # a part's crash is a finding for the report, not the end of the run
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        result = {"status": "failed", "message": f"{type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})"}
    result["peak_rss_bytes"] = max_rss_bytes()
    atomic_write_json(Path(spec["result"]), result)


def _tail(path: Path, lines: int = 4) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(ln.strip()[:200] for ln in text[-lines:])


def run_part(name: str, target: str, size: str, work: Path, threads: int, timeout_s: float) -> PartResult:
    """One part in a fresh ``python -c`` process (its own session, so a timeout stops its subprocesses too)."""
    work.mkdir(parents=True, exist_ok=True)
    result_path, log_path = work / "_result.json", work / "_log.txt"
    spec = {"target": target, "size": size, "work": str(work / "work"), "threads": threads,
            "result": str(result_path)}
    (work / "work").mkdir(exist_ok=True)
    code = "import sys; from diffkit.bench.all import _child_main; _child_main(sys.argv[1])"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=log_fh, stderr=log_fh,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except KeyboardInterrupt:  # its own session does not get the terminal's Ctrl-C: stop it, then stop
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group only
            proc.wait()
            return PartResult(name, target, "failed", time.perf_counter() - t0, None,
                              f"stopped after {timeout_s:.0f} s (time limit); last output: {_tail(log_path)}")
    seconds = time.perf_counter() - t0
    if not result_path.exists():
        return PartResult(name, target, "failed", seconds, None,
                          f"the part's process ended with status {rc} and no result; last output: {_tail(log_path)}")
    got = json.loads(result_path.read_text())
    rows = [BenchRow.from_dict(r) for r in got.get("rows", [])]
    message = got.get("message", "")
    if got["status"] == "failed" and _tail(log_path, 2):
        message += f"; last output: {_tail(log_path, 2)}"
    return PartResult(name, target, got["status"], seconds, got.get("peak_rss_bytes"), message, rows)


# -- the parent ---------------------------------------------------------------------------------

def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def gpu_reference(report_dir: Path) -> dict | None:
    """The last GPU run's figures (``gpu.json`` beside the report) as rows, with its device and date."""
    from .gpu import gpu_rows

    path = report_dir / GPU_REFERENCE
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return {"source": GPU_REFERENCE, "command": result.get("command"), "started_utc": result.get("started_utc"),
            "device": result["device"], "rows": [r.to_dict() for r in gpu_rows(result)]}


def run_all(cfg: AllConfig, log: Callable[[str], None] = print) -> dict:
    """Run the selected parts (each in its own process), return the summary (what summary.json holds)."""
    from .machine import machine_info, sample_load

    t_start = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(cfg.out)
    cuda = cfg.size == "full" and _cuda_available()
    if cfg.only and any(n in GPU_PARTS for n in cfg.only) and not cuda:
        raise DiffkitError("the gpu part needs --full on a machine with CUDA: drop it from --only or run it there")
    load = [sample_load("before", 1.0)]
    if load[0].busy_percent >= 20:
        log(f"note: other processes use {load[0].busy_percent:.0f}% of a core: timings are taken under load")
    gpu_why = "no CUDA device on this machine" if cfg.size == "full" else "runs only with --full on a CUDA machine"
    todo = [(n, t) for n, t in REGISTRY if (not cfg.only or n in cfg.only) and (n not in GPU_PARTS or cuda)]
    parts: list[PartResult] = []
    timeout = TIMEOUT_S[cfg.size]
    with tempfile.TemporaryDirectory(prefix="diffkit-bench-all-") as tmp:
        for name, target in REGISTRY:
            if (name, target) not in todo:
                why = "not in --only" if cfg.only and name not in cfg.only else gpu_why
                parts.append(PartResult(name, target, "not run", message=why))
                continue
            part = run_part(name, target, cfg.size, Path(tmp) / name, cfg.threads, timeout)
            parts.append(part)
            peak = f", peak RSS {part.peak_rss_bytes / 2**20:,.0f} MiB" if part.peak_rss_bytes else ""
            budget = BUDGET_S.get(name) if cfg.size == "small" else None
            over = f" (over its {budget} s budget)" if budget and part.seconds > budget else ""
            what = f"{len(part.rows)} rows" if part.status == "ok" else part.message
            log(f"[{todo.index((name, target)) + 1}/{len(todo)}] {name:<10} {part.status:<7} {part.seconds:6.1f} s"
                f"{over}{peak}: {what}")
    load.append(sample_load("after", 1.0))
    report_dir = out.parent
    links = {name: rel for name, rel in DETAIL_REPORTS.items() if (report_dir / rel).exists()}
    others = {title: rel for title, rel in OTHER_REPORTS.items() if (report_dir / rel).exists()}
    return {"kind": SUMMARY_KIND, "format_version": SUMMARY_FORMAT_VERSION, "command": cfg.command,
            "config": asdict(cfg), "started_utc": started, "seconds": time.perf_counter() - t_start,
            "git_commit": _git_commit(), "machine": asdict(machine_info(cfg.threads)),
            "load": [asdict(s) for s in load], "cuda": cuda, "budget_s": BUDGET_S, "total_budget_s": TOTAL_BUDGET_S,
            "parts": [p.to_dict() for p in parts], "gpu_reference": None if cuda else gpu_reference(report_dir),
            "links": links, "other_reports": others}


def failed_parts(summary: dict) -> list[str]:
    """Names of the parts that failed or are missing (the reasons for a non-zero exit status)."""
    return [p["name"] for p in summary["parts"] if p["status"] in ("failed", "missing")]


def write_summary(summary: dict, out: Path) -> Path:
    """``out`` (markdown) and ``summary.json`` beside it, atomically; the JSON first, so the markdown is
    never newer than the figures it shows."""
    from ..io import atomic_write_bytes
    from .summary_report import render_summary

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_name("summary.json"), summary)
    atomic_write_bytes(out, render_summary(summary).encode())
    return out
