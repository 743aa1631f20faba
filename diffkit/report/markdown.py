"""Markdown that renders on GitHub: escaped context cells, and tables written both as markdown and CSV.

A context is text with the token a feature fires on marked ``[[token]]`` (FeatureDiff contexts) or
``«token»`` (crosscoder analysis contexts); :func:`md_context` shows that token in bold (a space as
␣), escapes markdown's special characters and keeps indentation with no-break spaces.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

_MD_SPECIAL = re.compile(r"([\\`*_<>|\[\]#~])")
_MARKED = re.compile(r"(.*?)(?:\[\[(.*?)\]\]|«(.*?)»)(.*)", flags=re.S)


def escape(text: str) -> str:
    """Text as a markdown table cell: special characters escaped, spaces made no-break (indentation survives)."""
    return _MD_SPECIAL.sub(r"\\\1", text).replace(" ", "\u00a0")


def md_context(text: str) -> str:
    """A decoded context as a markdown table cell: the marked token in bold (a space shown as ␣)."""
    match = _MARKED.fullmatch(text.replace("\n", "⏎"))
    if match is None:
        return escape(text)
    before, marked_a, marked_b, after = match.groups()
    marked = marked_a if marked_a is not None else marked_b
    return f"{escape(before)}**{escape(marked.replace(' ', '␣'))}**{escape(after)}"


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number for a table: fixed digits, thousands separators for integers, ``n/a`` for missing."""
    if value is None or isinstance(value, str):
        return "n/a" if value is None else value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return f"{int(value):,}"
    value = float(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def human(value: float, unit: str = "") -> str:
    """1.2e9 -> '1.2 G' (FLOPs, tokens)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


class Tables:
    """Writes each table as ``tables/NAME.csv`` and returns its markdown with the regenerating command."""

    def __init__(self, out: Path, command: str):
        self.dir = Path(out) / "tables"
        self.command = command
        self.names: list[str] = []

    def add(self, name: str, df: Any, fmt: dict[str, Callable[[Any], str]] | None = None,
            columns: dict[str, str] | None = None, cells: dict[str, list[str]] | None = None) -> list[str]:
        """Markdown lines of ``df`` (``fmt``: per-column cell formatters returning markdown; ``columns``:
        display names; ``cells``: ready markdown cells of a column, e.g. contexts, while the CSV keeps
        the plain values), the CSV written beside, and a line naming both the CSV and the command."""
        from ..io import atomic_write_bytes

        if name in self.names:
            raise ValueError(f"table {name} written twice")
        self.names.append(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / f"{name}.csv",
                           df.to_csv(index=False, float_format="%.6g", lineterminator="\n").encode())
        fmt = fmt or {}
        header = [(columns or {}).get(c, c) for c in df.columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        cells = cells or {}
        for n, row in enumerate(df.itertuples(index=False)):
            out = [cells[c][n] if c in cells else fmt[c](v) if c in fmt else _cell(v) for c, v in zip(df.columns, row)]
            lines.append("| " + " | ".join(out) + " |")
        return lines + ["", f"<sub>Table `tables/{name}.csv` · regenerate: `{self.command}`</sub>", ""]


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value.replace("|", "\\|")
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return fmt_num(value)
