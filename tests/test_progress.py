"""Progress off a terminal is a few plain lines with the bar's figures; on a terminal it is a tqdm bar.

The clock is injected, so no assertion depends on how fast this machine runs.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from diffkit.progress import LINE_SECONDS, LineProgress, tqdm


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_every_tenth_with_the_bars_figures():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=200, desc="collect", unit="tok", file=out, clock=clock)
    for i in range(200):
        clock.t += 0.5  # 2 tok/s: the time rule (30 s) fires never before the 10% rule (10 s)
        bar.set_postfix(loss=f"{2 - i / 100:.2f}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    for k, line in enumerate(lines, start=1):
        n = 20 * k
        assert line.startswith(f"collect: {10 * k:3d}% {n}/200 ["), line
        assert "2.00tok/s" in line and f"loss={2 - (n - 1) / 100:.2f}" in line, line
    assert lines[-1].startswith("collect: 100% 200/200 [01:40<00:00")


def test_slow_progress_and_unknown_totals_print_every_30_seconds():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=10_000, desc="train", unit="step", file=out, clock=clock)
    for _ in range(5):
        clock.t += LINE_SECONDS / 3  # 0.01% per update: only the time rule fires, every third update
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 1
    clock.t += LINE_SECONDS
    bar.update(1)
    assert len(out.getvalue().splitlines()) == 2
    bar.close()  # the last line is written on close when the count moved since the previous one
    assert len(out.getvalue().splitlines()) == 2

    out, clock = io.StringIO(), Clock()
    with LineProgress(desc="stream", file=out, clock=clock, initial=5) as bar:  # resumed at 5, no total
        for _ in range(7):
            clock.t += 20.0
            bar.update(3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # at 40, 80, 120 s (>= 30 s apart) and on close (140 s)
    assert lines[-1].startswith("stream: 26 [02:20, ") and "s/it" in lines[-1]  # rate counts from the resume point


def test_iteration_and_the_factory_choose_by_the_stream():
    out, clock = io.StringIO(), Clock()
    seen = []
    for x in tqdm(range(4), desc="items", file=out):
        seen.append(x)
    assert seen == [0, 1, 2, 3] and len(out.getvalue().splitlines()) == 4  # 25% each: a line per item
    assert isinstance(tqdm(total=3, file=io.StringIO()), LineProgress)
    from tqdm import tqdm as real

    assert isinstance(tqdm(total=3, file=FakeTty()), real)  # on a terminal: the real bar
    quiet = tqdm(range(3), disable=True)
    assert list(quiet) == [0, 1, 2]
    del clock


def test_no_stage_imports_tqdm_directly():
    """Every progress bar of diffkit/ and baselines/ goes through diffkit.progress (one mechanism)."""
    root = Path(__file__).resolve().parents[1]
    direct = [str(p.relative_to(root)) for d in ("diffkit", "baselines") for p in (root / d).rglob("*.py")
              if p.name != "progress.py" and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    assert direct == []


def test_fit_map_progress_off_a_terminal_is_plain_lines(small_store, tmp_path):
    """The real CLI with stderr to a pipe (not a tty): a few plain lines, no carriage-return frames."""
    res = subprocess.run([sys.executable, "-m", "diffkit.cli", "fit-map", "--acts", str(small_store.root), "--out",
                          str(tmp_path / "map")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    progress = [line for line in res.stderr.splitlines() if line.startswith("fit-map:")]
    assert "\r" not in res.stderr and 1 <= len(progress) <= 11, res.stderr
    assert progress[-1].startswith(f"fit-map: 100% {small_store.n_shards}/{small_store.n_shards} ["), progress
