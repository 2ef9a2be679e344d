"""The fp32 ``torch.mm`` rate the achieved GFLOP/s are compared with, and the verdicts."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import cpu_sdpa_flop_mapping
from benchmarks.measure import log, median

#: Target share of the matmul rate for a training step.
TARGET_PCT_OF_MATMUL = 85.0


def matmul_samples(n: int, reps: int) -> List[float]:
    """GFLOP/s of ``reps`` fp32 torch.mm calls on n x n matrices (after one untimed call)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def matmul_gflops(n: int, reps: int) -> float:
    """Median fp32 torch.mm GFLOP/s over ``reps`` calls."""
    return median(matmul_samples(n, reps))


def apply_matmul_reference(report: Dict[str, Any]) -> None:
    """Set the run's best fp32 matmul rate and the percentages relative to it.

    The best rate is the highest median torch.mm rate seen anywhere in the run (size sweeps
    at the start and the end, samples next to each variant's timed steps). Other load on
    the machine can only lower a measured rate, so this is the conservative ceiling.
    """
    mm = report["matmul_reference"]
    candidates = {f"start {n}^2": g for n, g in mm["gflops_by_size"].items()}
    candidates.update({f"end {n}^2": g for n, g in mm.get("gflops_by_size_end", {}).items()})
    for name, v in report["variants"].items():
        candidates.update({f"next to {name} {n}^2": g for n, g in v["matmul_gflops_by_size"].items()})
    source = max(candidates, key=candidates.get)
    best = candidates[source]
    mm["best_gflops"], mm["best_source"] = best, source
    for v in report["variants"].values():
        v["pct_of_best_matmul"] = 100.0 * v["achieved_gflops"] / best
        v["target_met_vs_best"] = v["pct_of_best_matmul"] >= TARGET_PCT_OF_MATMUL


def matmul_verdict(variants: Dict[str, Any], key: str, what: str) -> str:
    pct = {n: v[key] for n, v in variants.items()}
    met = [n for n, p in pct.items() if p >= TARGET_PCT_OF_MATMUL]
    best, worst = max(pct, key=pct.get), min(pct, key=pct.get)
    head = f"met by {len(met)} of {len(pct)} variants" + (f" ({', '.join(met)})" if met else "")
    return (
        f"{head} against {what} (target >= {TARGET_PCT_OF_MATMUL:.0f}%): best {best} {pct[best]:.1f}%, "
        f"worst {worst} {pct[worst]:.1f}%"
    )


class TimedStep(NamedTuple):
    """What :func:`time_step` measured: FLOPs of one step, the median step time, every timed
    step, and the median fp32 ``torch.mm`` rate sampled before and between the timed steps."""

    flops: float
    step_s: float
    times: List[float]
    matmul_gflops: float


def time_step(step: Callable[[], None], *, warmup: int, steps: int, matmul_size: int, matmul_reps: int,
              tag: str) -> TimedStep:
    """Run ``step()`` ``warmup`` times untimed (the first under a FLOP counter, CPU flash attention
    included), then ``steps`` timed times, with ``torch.mm`` samples before and between them so
    that the step's rate is compared with a matmul rate under the same machine load."""
    counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flop_mapping())

    def run(flop_counter: Optional[FlopCounterMode] = None) -> float:
        t0 = time.perf_counter()
        with flop_counter if flop_counter is not None else contextlib.nullcontext():
            step()
        return time.perf_counter() - t0

    for i in range(warmup):
        log(f"[{tag}] warm-up {i + 1}/{warmup}: {run(counter if i == 0 else None):.2f} s")
    mm = matmul_samples(matmul_size, matmul_reps)
    times = []
    for i in range(steps):
        times.append(run())
        mm += matmul_samples(matmul_size, max(2, matmul_reps // 2))
        log(f"[{tag}] step {i + 1}/{steps}: {times[-1]:.2f} s")
    return TimedStep(counter.get_total_flops(), median(times), times, median(mm))


def step_report(timed: TimedStep, batch_size: int) -> Dict[str, Any]:
    """The report fields of a :func:`time_step` measurement of a step over ``batch_size`` clips."""
    achieved = timed.flops / timed.step_s / 1e9
    return {
        "step_ms": timed.step_s * 1e3,
        "step_ms_all": [t * 1e3 for t in timed.times],
        "clips_per_s": batch_size / timed.step_s,
        "gflop_per_step": timed.flops / 1e9,
        "gflop_per_clip": timed.flops / 1e9 / batch_size,
        "achieved_gflops": achieved,
        "matmul_gflops": timed.matmul_gflops,
        "pct_of_matmul": 100.0 * achieved / timed.matmul_gflops,
    }

