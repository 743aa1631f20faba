"""Facts about the machine a benchmark ran on, other processes' load, and peak memory."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass
class MachineInfo:
    platform: str
    python: str
    cpu_model: str
    cpu_count: int | None
    cpus_usable: int | None
    memory_gib: float
    torch_version: str
    transformer_lens_version: str
    numpy_version: str
    threads: int


@dataclass
class LoadSample:
    """Other processes' CPU use, sampled while this benchmark was idle (before or after it)."""

    when: str
    seconds: float       # sampling interval
    busy_percent: float  # all other processes together, in % of one core
    top: list[str]       # "pid NAME (x% CPU)" of the busiest


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> MachineInfo:
    from importlib.metadata import PackageNotFoundError, version

    import numpy as np
    import psutil
    import torch

    try:
        tl_version = version("transformer-lens")
    except PackageNotFoundError:
        tl_version = "unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return MachineInfo(platform=platform.platform(), python=platform.python_version(), cpu_model=_cpu_model(),
                       cpu_count=os.cpu_count(), cpus_usable=usable,
                       memory_gib=psutil.virtual_memory().total / 2**30, torch_version=torch.__version__,
                       transformer_lens_version=tl_version, numpy_version=np.__version__, threads=threads)


def sample_load(when: str, interval: float = 1.0, top: int = 3) -> LoadSample:
    """CPU use of every other process over ``interval`` seconds (this process and its children excluded)."""
    import psutil

    me = psutil.Process()
    mine = {me.pid} | {c.pid for c in me.children(recursive=True)}
    procs = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.info["pid"] in mine:
            continue
        try:
            proc.cpu_percent(None)
            procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    time.sleep(interval)
    usage = []
    for proc in procs:
        try:
            pct = proc.cpu_percent(None)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if pct > 0:
            cmd = " ".join(" ".join(proc.info["cmdline"] or [proc.info["name"] or "?"]).split())
            usage.append((pct, proc.info["pid"], cmd[:90].replace("`", "'")))
    usage.sort(reverse=True)
    return LoadSample(when, interval, sum(u[0] for u in usage),
                      [f"pid {pid} `{cmd}` ({pct:.0f}% CPU)" for pct, pid, cmd in usage[:top] if pct >= 5])



def max_rss_bytes() -> int:
    """This process's peak resident set size so far (a high-water mark: it never goes down).

    Linux: ``VmHWM`` of /proc/self/status, which belongs to the process's own address space.
    ``getrusage``'s ``ru_maxrss`` is *not* used there: it survives fork and exec, so a subprocess
    started by a large parent reports the parent's peak (seen here: every child read 1.6 GB).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


class RssSampler:
    """Current RSS every ``interval`` seconds on a background thread: shows *when* memory grows within
    a run (the exact peak is :func:`max_rss_bytes`; a sample can miss a peak shorter than the interval)."""

    def __init__(self, interval: float = 0.02):
        import threading

        import psutil

        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._proc = psutil.Process()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.samples.append((time.time(), self._proc.memory_info().rss))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def halves(self, t0: float, t1: float) -> list[int]:
        """Largest sampled RSS in the first and in the second half of [t0, t1] (0 where no sample)."""
        mid = (t0 + t1) / 2
        first = [rss for t, rss in self.samples if t0 <= t < mid]
        second = [rss for t, rss in self.samples if mid <= t <= t1]
        return [max(first, default=0), max(second, default=0)]


def machine_section(m: MachineInfo, load: Sequence[LoadSample], memory: str | None = None,
                    extra: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Every benchmark report's *Machine* table and *Load* list, as markdown lines (``memory`` replaces the
    memory row's text; ``extra``: more (name, value) rows)."""
    rows = [("platform", f"{m.platform}, Python {m.python}"),
            ("CPU", f"{m.cpu_model}; {m.cpu_count} logical CPUs ({m.cpus_usable} usable)"),
            ("memory", memory or f"{m.memory_gib:.1f} GiB"),
            ("torch", f"{m.torch_version}, {m.threads} threads in every measurement"), *extra]
    lines = ["## Machine", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "Load (other processes' CPU use, sampled while the benchmark itself was idle):", ""]
    for s in load:
        lines.append(f"- {s.when} the run, over {s.seconds:g} s: {s.busy_percent:.0f}% of one core: "
                     f"{'; '.join(s.top) if s.top else 'nothing notable'}")
    return lines + [""]
