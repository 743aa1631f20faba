"""Progress reporting that reads well on a terminal and in a log file.

Every long loop in diffkit and baselines/ uses :func:`tqdm` from here, a drop-in for ``tqdm.tqdm``
(same arguments, same ``update`` / ``set_postfix`` / ``close`` / context manager / iteration):

- on a terminal (the output stream is a tty): a real tqdm bar;
- off a terminal (CI, ``make demo > log 2>&1``): :class:`LineProgress`, one plain line about every
  10% of the total, or every 30 s when progress is slower than that (or the total is unknown),
  and a last line on close, each with the bar's own figures (tqdm's ``format_meter``: description,
  percentage, n/total, elapsed<remaining, rate, postfix). A bar off a terminal would write one
  carriage-return frame per refresh instead, a single log "line" of tens of thousands of characters.

Example line: ``collect:  40% 1.60k/4.00k tok [00:02<00:03, 800tok/s, shards=2]``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, TextIO

LINE_FRACTION = 0.1     # a line each time another 10% of the total is done
LINE_SECONDS = 30.0     # ... or when this long has passed since the last line
LINE_FORMAT = "{desc}{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_FORMAT_NO_TOTAL = "{desc}{n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or file-like without isatty
        return False


def tqdm(iterable: Iterable | None = None, *args: Any, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal, a :class:`LineProgress` off one (decided by the stream it writes to)."""
    stream = kwargs.get("file") or sys.stderr
    if kwargs.get("disable") or _is_tty(stream):
        from tqdm import tqdm as bar

        return bar(iterable, *args, **kwargs)
    return LineProgress(iterable, *args, **kwargs)


class LineProgress:
    """tqdm's interface, printing plain lines (see the module docstring). ``clock`` is injectable for tests."""

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None, total: float | None = None,
                 leave: bool = True, file: TextIO | None = None, unit: str = "it", unit_scale: bool | float = False,
                 initial: float = 0, disable: bool = False, postfix: Any = None,
                 clock: Callable[[], float] = time.monotonic, **_ignored: Any):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable, self.desc, self.total = iterable, desc or "", total
        self.file = file or sys.stderr
        self.unit, self.unit_scale, self.initial, self.disable = unit, unit_scale, initial, disable
        self.n = initial
        self.clock = clock
        self.start_t = self.last_t = clock()
        self.last_n = initial
        self.postfix = ""
        self.closed = False
        if postfix:
            self.set_postfix(postfix, refresh=False)

    # -- tqdm's interface ---------------------------------------------------------------------
    def __iter__(self):
        if self.iterable is None:
            raise TypeError("LineProgress was made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if self._crossed_step() or (now - self.last_t >= LINE_SECONDS and self.n != self.last_n):
            self._emit(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass  # lines are written on progress, not on demand

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.n != self.last_n:
            self._emit(self.clock())

    # -- lines ----------------------------------------------------------------------------------
    def _crossed_step(self) -> bool:
        if not self.total:
            return False
        step = LINE_FRACTION * self.total
        return int(self.n // step) > int(self.last_n // step)

    def format(self, now: float) -> str:
        from tqdm import tqdm as bar

        total = self.total if self.total else None
        return bar.format_meter(self.n, total, now - self.start_t, prefix=f"{self.desc}: " if self.desc else "",
                                unit=self.unit, unit_scale=self.unit_scale, postfix=self.postfix or None,
                                initial=self.initial, bar_format=LINE_FORMAT if total else LINE_FORMAT_NO_TOTAL)

    def _emit(self, now: float) -> None:
        if self.disable:
            return
        self.file.write(self.format(now) + "\n")
        self.file.flush()
        self.last_t, self.last_n = now, self.n
