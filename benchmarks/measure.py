"""Small measurement helpers shared by the benchmarks: flushed log lines, medians, peak RSS."""
from __future__ import annotations

import resource
import statistics
import sys
from typing import List

MIB = 1024 * 1024


def log(msg: str) -> None:
    print(msg, flush=True)


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024.0
