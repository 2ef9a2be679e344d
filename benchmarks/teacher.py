"""The frozen CLAP teacher: offline extraction clips/s and the online teacher's share of a step.

A randomly initialised HTSAT-tiny (or a narrow test teacher) in LAION-CLAP's checkpoint
layout, ``final`` map, on 10 s clips at 48 kHz under ``torch.no_grad``.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Dict

import torch

from benchmarks.measure import median
from mam_clap_fixtures.clap import save_random_clap_checkpoint
from mam_clap_plugin.teacher import load_clap_teacher


def bench_teacher(batch: int, steps: int, size: str) -> Dict[str, Any]:
    """Forward throughput of the frozen CLAP teacher on 10 s clips (random weights, real shapes)."""
    small = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]) if size == "small" else {}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_clap_checkpoint(os.path.join(tmp, "clap.pt"), "laion", "tiny", **small)
        teacher = load_clap_teacher(path, "final")
    wav = torch.randn(batch, teacher.num_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    times = []
    with torch.no_grad():
        teacher(wav)  # warm-up
        for _ in range(steps):
            t0 = time.perf_counter()
            teacher(wav)
            times.append(time.perf_counter() - t0)
    batch_s = median(times)
    return {
        "teacher": teacher.name,
        "layer": teacher.layer,
        "grid": list(teacher.grid),
        "dim": teacher.dim,
        "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "batch_size": batch,
        "clip_seconds": teacher.seconds,
        "sample_rate": teacher.sample_rate,
        "batch_ms_all": [1e3 * t for t in times],
        "batch_ms": 1e3 * batch_s,
        "clips_per_s": batch / batch_s,
    }


def online_teacher_cost(teacher: Dict[str, Any], variants: Dict[str, Any], batch: int) -> Dict[str, Any]:
    """Teacher time per student batch as a fraction of (teacher + student step), CLAP variants."""
    teacher_ms = 1e3 * batch / teacher["clips_per_s"]
    return {
        name: {"teacher_ms_per_batch": teacher_ms, "step_ms": v["step_ms"],
               "fraction_of_step": teacher_ms / (teacher_ms + v["step_ms"])}
        for name, v in variants.items() if v["settings"]["target"] == "clap"
    }
