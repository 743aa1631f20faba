"""One row of the benchmark summary (``reports/benchmarks/README.md``), shared by every benchmark.

Each benchmark keeps its own detailed report; for ``diffkit bench all`` it also returns a list of
:class:`BenchRow`: the figure, the baseline measured in the same run, their ratio, the peak memory
and the device. The ratio is always "how many times better diffkit is than the baseline" (> 1:
diffkit is better), whatever the unit, so a reader never has to know which way a unit points.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BenchRow:
    benchmark: str                  # which benchmark: "collect", "align", "crosscoder", "scale", "soak", ...
    case: str                       # what was measured, e.g. "assignment, 16,384 features, d 2304"
    figure: float                   # diffkit's figure
    unit: str                       # "s", "tokens/s", "GFLOP/s", "GiB", "count", ...
    baseline: str | None = None     # what it is compared with, e.g. "scipy linear_sum_assignment (dense)"
    baseline_figure: float | None = None
    ratio: float | None = None      # times better than the baseline (> 1 better); see speedup / throughput_ratio
    peak_rss_bytes: int | None = None  # peak resident memory of the process that measured `figure`
    device: str = "cpu"             # "cpu" or the accelerator's name
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchRow":
        return cls(**d)


def speedup(seconds: float, baseline_seconds: float | None) -> float | None:
    """Ratio for times (lower is better): baseline / diffkit."""
    if baseline_seconds is None or not seconds or seconds <= 0:
        return None
    return baseline_seconds / seconds


def throughput_ratio(rate: float, baseline_rate: float | None) -> float | None:
    """Ratio for rates (higher is better): diffkit / baseline."""
    if baseline_rate is None or not baseline_rate or baseline_rate <= 0:
        return None
    return rate / baseline_rate
