"""Summary of ``torch.profiler`` runs: self CPU time per op over several steps, grouped."""
from __future__ import annotations

from typing import Any, Dict

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv"}


def op_group(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul (mm/addmm/bmm)"
    if "scaled_dot_product" in name:
        return "attention kernel (sdpa)"
    if "adam" in name.lower() or name.startswith("Optimizer."):
        return "optimizer"
    if "conv" in name:
        return "patch-embedding conv"
    if name in ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone", "aten::contiguous", "aten::cat"):
        return "copies/fills"
    return "other (elementwise, norms, autograd glue)"


class ProfileTotals:
    """Self CPU time and call counts per op, summed over several profiled steps."""

    def __init__(self):
        self.self_us: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self.steps = 0

    def add(self, prof) -> None:
        self.steps += 1
        for e in prof.key_averages():
            self.self_us[e.key] = self.self_us.get(e.key, 0.0) + e.self_cpu_time_total
            self.calls[e.key] = self.calls.get(e.key, 0) + e.count

    def summary(self, top_k: int = 8) -> Dict[str, Any]:
        items = sorted(((k, v) for k, v in self.self_us.items() if v > 0), key=lambda kv: -kv[1])
        total_us = sum(v for _, v in items)
        n = self.steps
        top = [
            {
                "op": k,
                "self_cpu_ms_per_step": v / 1e3 / n,
                "share_pct": 100.0 * v / total_us,
                "calls_per_step": self.calls[k] / n,
            }
            for k, v in items[:top_k]
        ]
        groups: Dict[str, float] = {}
        for k, v in items:
            groups[op_group(k)] = groups.get(op_group(k), 0.0) + v
        return {
            "profiled_steps": n,
            "self_cpu_ms_per_step": total_us / 1e3 / n,
            "ops_recorded_per_step": sum(self.calls[k] for k, _ in items) / n,
            "top_ops": top,
            "groups_share_pct": {g: 100.0 * t / total_us for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
        }
