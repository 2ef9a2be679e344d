"""Small measurement helpers shared by the benchmarks: flushed log lines, medians, peak RSS, the JSON report."""
from __future__ import annotations

import json
import resource
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Union

MIB = 1024 * 1024


def log(msg: str) -> None:
    print(msg, flush=True)


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024.0


def write_report(report: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Write a benchmark's JSON report to ``path``, creating its directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out
