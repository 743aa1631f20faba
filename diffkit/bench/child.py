"""One measurement in a fresh ``python -c`` process, for every benchmark that measures memory.

Why a process each: a process's RSS high-water mark (VmHWM) never goes down, so a peak measured
after another measurement in the same process is the larger of the two. The child runs
``module:function(spec)`` and prints its JSON result on a marked line; the parent reads that line,
so whatever else the child prints (warnings, progress) does not matter.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

from ..errors import DiffkitError

CHILD_MARKER = "DIFFKIT_BENCH_RESULT "


def child_env(threads: int) -> dict:
    """The environment of a child that must use ``threads`` BLAS/OpenMP threads, with progress bars off."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TQDM_DISABLE", "1")
    return env


def run_child(target: str, spec: dict, what: str, timeout: float, threads: int | None = None) -> dict:
    """``target`` ("package.module:function", taking ``spec`` and returning a JSON-able dict) run in a fresh
    process; ``what`` names the measurement in the one-line error when it fails or runs over ``timeout`` s."""
    code = f"import sys; from diffkit.bench.child import child_main; child_main({target!r}, sys.argv[1])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=child_env(threads) if threads else None)
    except subprocess.TimeoutExpired:
        raise DiffkitError(f"benchmark subprocess ({what}) ran over {timeout:.0f} s and was stopped") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or "no output"
        raise DiffkitError(f"benchmark subprocess ({what}) failed with exit status {proc.returncode}: {tail}")
    return json.loads(lines[-1][len(CHILD_MARKER):])


def child_main(target: str, spec_json: str) -> None:
    """The child's entry point (see :func:`run_child`)."""
    module, _, function = target.partition(":")
    result = getattr(importlib.import_module(module), function)(json.loads(spec_json))
    print(CHILD_MARKER + json.dumps(result), flush=True)
