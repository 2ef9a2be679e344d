#!/usr/bin/env python
"""CPU pretraining benchmark for the four SupMAM-CLAP variants.

Run (``make bench``)::

    .venv/bin/python benchmarks/bench_pretrain.py --out outputs/bench/pretrain.json

Smoke run: ``--size tiny --steps 1 --warmup 1 --batch-size 2``.

What is measured, per variant (MAM, MAM-CLAP, SupMAM, SupMAM-CLAP):

* The model and criterion settings come from ``examples/pretraining/config/<variant>.yaml``
  (plus ``size/<size>.yaml`` with ``--size``), read with omegaconf; the model is built
  directly as ``SupMamClapModel(SupMamClapConfig(**cfg.model))``, the loss is the real
  ``SupMamClapCriterion`` (which calls ``clap_target_loss`` / ``reconstruction_loss`` /
  ``soft_cross_entropy``), the optimiser is ``torch.optim.AdamW`` with the YAML's lr,
  betas, eps and weight decay.
* Inputs: random normalised fbank (B, 1, task.target_length, 128), random teacher tokens
  (B, N, 768) for the CLAP targets (768 is a stand-in teacher width: the real width comes
  from the target store), random multi-hot labels over 527 classes (AudioSet).
* One training step = criterion forward (model forward + loss) + zero_grad + backward +
  AdamW step. The first warm-up step runs under ``FlopCounterMode`` to count the model's
  forward + backward FLOPs; the timed steps follow the warm-up, and the median is reported.
* Achieved GFLOP/s = counted FLOPs / median step time, compared with the fp32 ``torch.mm``
  rate of square matrices measured in the same process with the same thread count.
* torch.profiler (CPU activity only, no shapes or stacks) records the timed steps; the
  JSON lists the top ops by self CPU time and a grouping (matmul, attention, ...).

Plus: the CLAP teacher (``mam_clap_plugin.teacher``, randomly initialised HTSAT-tiny in
LAION-CLAP's checkpoint layout, ``final`` map): extraction clips/s at ``--teacher-batch``
10 s clips at 48 kHz (``torch.no_grad``, median of the timed batches), and the online
teacher's cost as a fraction of a training step of each CLAP variant, for a batch of the
student's size: ``teacher_ms / (teacher_ms + step_ms)``.

Plus: the data pipeline (``load_audio`` + ``wav_to_fbank`` + ``normalize_fbank``) in clips/s
for one worker (1 torch thread) on 10 s clips at 44.1 kHz stereo, 48 kHz stereo and 16 kHz
mono, its ratio to the model's clips/s per core, the peak RSS and machine information.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the CPU-only profiler quiet (no CUDA device messages)

import numpy as np  # noqa: E402
import soundfile
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from mam_clap_plugin.criterions.supmam_clap import SupMamClapCriterion, SupMamClapCriterionConfig
from mam_clap_plugin.data.audio import load_audio, normalize_fbank, resolve_norm_stats, wav_to_fbank
from mam_clap_plugin.hydra_runs import compose_config
from mam_clap_plugin.models.supmam_clap import SupMamClapConfig, SupMamClapModel
from mam_clap_plugin.modules.encoder import num_visible
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402  (benchmarks/machine.py, next to this script)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "examples" / "pretraining" / "config"
VARIANTS = ("mam", "mam_clap", "supmam", "supmam_clap")
TEACHER_DIM = 768  # teacher token width for target=clap: LAION-CLAP HTSAT-tiny's final map
NUM_CLASSES = 527  # AudioSet classes for the classification branch
TARGET_PCT_OF_MATMUL = 85.0
TARGET_PIPELINE_RATIO = 10.0
CLIP_SECONDS = 10.0
PIPELINE_FORMATS = {  # name -> (sample rate, channels)
    "44k1_stereo": (44100, 2),
    "48k_stereo": (48000, 2),
    "16k_mono": (16000, 1),
}
MIB = 1024 * 1024


def log(msg: str) -> None:
    print(msg, flush=True)


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024.0


# --------------------------------------------------------------------------------------
# Configuration


def load_variant(name: str, size: Optional[str]) -> Dict[str, Any]:
    """Read one variant's config (base.yaml + the variant, and the size override) into plain dicts."""
    cfg = compose_config(str(CONFIG_DIR), name, [f"+size={size}"] if size else [])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("_name", None)
    if model.get("target") == "clap":
        model["target_dim"] = TEACHER_DIM
    if model.get("classification_branch"):
        model["num_classes"] = NUM_CLASSES
    criterion = OmegaConf.to_container(cfg.criterion, resolve=True)
    criterion.pop("_name", None)
    betas = cfg.optimizer.get("adam_betas", "(0.9, 0.999)")
    optimizer = {
        "lr": float(cfg.optimization.lr[0]),
        "betas": tuple(float(b) for b in (ast.literal_eval(betas) if isinstance(betas, str) else betas)),
        "eps": float(cfg.optimizer.get("adam_eps", 1e-8)),
        "weight_decay": float(cfg.optimizer.get("weight_decay", 0.0)),
    }
    return {
        "model": model,
        "criterion": criterion,
        "optimizer": optimizer,
        "target_length": int(cfg.task.target_length),
        "norm_stats": str(cfg.task.get("norm_stats", "audioset")),
    }


# --------------------------------------------------------------------------------------
# FLOP counting

# torch's FlopCounterMode has formulas for the CUDA SDPA kernels but not for the CPU flash
# kernel that F.scaled_dot_product_attention picks on CPU, which would count attention as
# 0 FLOPs. These mirror torch's sdpa_flop_count / sdpa_backward_flop_count.


def _sdpa_fwd_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = q
    sk, dv = k[2], v[3]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


def _sdpa_bwd_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = q
    sk, dv = k[2], v[3]
    # recompute scores, grad scores, grad V, grad Q, grad K
    return 2 * b * h * (sq * sk * d + sq * sk * dv + sk * sq * dv + sq * sk * d + d * sq * sk)


def cpu_sdpa_flop_mapping() -> Dict[Any, Callable]:
    aten = torch.ops.aten
    mapping = {}
    for op_name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_fwd_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_bwd_flops),
    ):
        if hasattr(aten, op_name):
            mapping[getattr(aten, op_name)] = fn
    return mapping


def flops_by_module(counts: Dict[str, Dict[Any, int]]) -> Dict[str, float]:
    """GFLOP per direct child of the model (encoder, decoder, head, classifier).

    ``counts`` is a snapshot of ``FlopCounterMode.get_flop_counts()`` taken after the
    forward pass: the module attribution of backward ops is not reliable (gradients that
    flow through shared inputs get credited to whichever module hook ran last).
    """
    out = {}
    for name, ops in counts.items():
        parts = name.split(".")
        if len(parts) == 2:
            out[parts[1]] = sum(ops.values()) / 1e9
    return out


# --------------------------------------------------------------------------------------
# Matmul reference


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


# --------------------------------------------------------------------------------------
# Profiling summary

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


# --------------------------------------------------------------------------------------
# Training-step benchmark


def make_batch(batch: int, frames: int, num_tokens: int, generator: torch.Generator) -> Dict[str, Any]:
    source = torch.randn(batch, 1, frames, 128, generator=generator) * 0.5  # ~ (fbank - mean) / (2 std)
    labels = (torch.rand(batch, NUM_CLASSES, generator=generator) < 0.01).float()
    labels[torch.arange(batch), torch.randint(NUM_CLASSES, (batch,), generator=generator)] = 1.0
    return {
        "id": torch.arange(batch),
        "nsentences": batch,
        "net_input": {"source": source},
        "target": torch.randn(batch, num_tokens, TEACHER_DIM, generator=generator),
        "label": labels,
    }


def bench_variant(name: str, spec: Dict[str, Any], args) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = SupMamClapModel(SupMamClapConfig(**spec["model"]))
    model.train()
    criterion = SupMamClapCriterion(SupMamClapCriterionConfig(**spec["criterion"]), task=None)
    criterion.train()
    opt_kw = dict(spec["optimizer"])
    if args.adamw_impl == "fused":
        opt_kw["fused"] = True
    elif args.adamw_impl == "foreach":
        opt_kw["foreach"] = True
    else:
        opt_kw["foreach"] = False
    optimizer = torch.optim.AdamW(model.parameters(), **opt_kw)

    frames = spec["target_length"]
    t, f = model.encoder.grid(frames)
    sample = make_batch(args.batch_size, frames, t * f, torch.Generator().manual_seed(1))
    if model.cfg.target != "clap":
        del sample["target"]
    params = sum(p.numel() for p in model.parameters())
    log(f"[{name}] {params / 1e6:.1f} M params, input {tuple(sample['net_input']['source'].shape)}")

    fwd_counts: Dict[str, Dict[Any, int]] = {}

    def step(flop_counter: Optional[FlopCounterMode] = None):
        c0 = time.process_time()
        t0 = time.perf_counter()
        with flop_counter if flop_counter is not None else contextlib.nullcontext():
            loss, _, _ = criterion(model, sample)
            if flop_counter is not None:  # forward-only snapshot (reliable module attribution)
                fwd_counts.update({k: dict(v) for k, v in flop_counter.get_flop_counts().items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        return t2 - t0, t1 - t0, t2 - t1, float(loss.detach()), cpu

    # Warm-up; the first step counts FLOPs (forward + backward; the optimiser adds none).
    counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flop_mapping())
    for i in range(args.warmup):
        total, _, _, loss, _ = step(counter if i == 0 else None)
        log(f"[{name}] warm-up {i + 1}/{args.warmup}{' (FLOP count)' if i == 0 else ''}: {total:.2f} s, loss {loss:.4f}")
    flops = counter.get_total_flops()
    flops_by_op = {str(k).replace("aten.", "aten::", 1): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    fwd_flops = sum(fwd_counts.get("Global", {}).values())
    by_module = flops_by_module(fwd_counts)

    # Timed steps. torch.mm samples before and between them give a matmul rate under the
    # same machine load; each step is profiled separately so the samples stay out of it.
    mm_rates = {n: matmul_samples(n, args.matmul_reps) for n in args.adjacent_sizes}
    load_before = os.getloadavg()
    totals, fwd_bwd, opt_times, cpu_times = [], [], [], []
    profile = ProfileTotals()
    for i in range(args.steps):
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                total, fb, op, loss, cpu = step()
            profile.add(prof)
        else:
            total, fb, op, loss, cpu = step()
        cpu_times.append(cpu)
        totals.append(total)
        fwd_bwd.append(fb)
        opt_times.append(op)
        log(f"[{name}] step {i + 1}/{args.steps}: {total:.2f} s (fwd+loss+bwd {fb:.2f} s, AdamW {op:.3f} s), loss {loss:.4f}")
        for n in args.adjacent_sizes:
            mm_rates[n] += matmul_samples(n, max(2, args.matmul_reps // 2))
    load_after = os.getloadavg()
    mm_adjacent_by_size = {str(n): median(r) for n, r in mm_rates.items()}
    mm_adjacent = max(mm_adjacent_by_size.values())

    step_s = median(totals)
    achieved = flops / step_s / 1e9
    threads = torch.get_num_threads()
    res = {
        "settings": {
            "mask_ratio": spec["model"]["mask_ratio"],
            "target": spec["model"]["target"],
            "classification_branch": bool(spec["model"]["classification_branch"]),
            "decoder_layers": spec["model"]["decoder_layers"],
            "lambda_cls": spec["criterion"].get("lambda_cls", 0.0),
            "model": spec["model"],
            "criterion": spec["criterion"],
            "optimizer": {**spec["optimizer"], "impl": args.adamw_impl},
        },
        "params_m": params / 1e6,
        "tokens": t * f,
        "visible_tokens": num_visible(t * f, spec["model"]["mask_ratio"]) if spec["model"]["mask_ratio"] > 0 else t * f,
        "step_ms": step_s * 1e3,
        "step_ms_all": [x * 1e3 for x in totals],
        "fwd_loss_bwd_ms": median(fwd_bwd) * 1e3,
        "optimizer_step_ms": median(opt_times) * 1e3,
        "clips_per_s": args.batch_size / step_s,
        "clips_per_s_per_core": args.batch_size / step_s / threads,
        "gflop_per_step": flops / 1e9,
        "gflop_forward": fwd_flops / 1e9,
        "gflop_forward_by_module": by_module,
        "achieved_gflops": achieved,
        "matmul_gflops": mm_adjacent,
        "matmul_gflops_by_size": mm_adjacent_by_size,
        "matmul_samples": {str(n): len(r) for n, r in mm_rates.items()},
        "pct_of_matmul": 100.0 * achieved / mm_adjacent,
        "target_pct": TARGET_PCT_OF_MATMUL,
        "target_met": 100.0 * achieved / mm_adjacent >= TARGET_PCT_OF_MATMUL,
        # pct_of_best_matmul / target_met_vs_best: filled in by apply_matmul_reference() at the end of the run
        "cpu_utilisation_pct": 100.0 * sum(cpu_times) / sum(totals) / threads,
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "peak_rss_mib_so_far": peak_rss_mib(),
    }
    if args.profile:
        res["profile"] = profile.summary()
        # FLOP rate inside the matmul and attention kernels: counted FLOPs / profiled self time.
        rates = {}
        for group in ("matmul (mm/addmm/bmm)", "attention kernel (sdpa)"):
            ops = [k for k in profile.self_us if op_group(k) == group]
            g_flops = sum(flops_by_op.get(k, 0) for k in ops)
            g_s = sum(profile.self_us[k] for k in ops) / 1e6 / profile.steps
            if g_flops > 0 and g_s > 0:
                rates[group] = {
                    "gflop_per_step": g_flops / 1e9,
                    "self_s_per_step": g_s,
                    "gflops": g_flops / 1e9 / g_s,
                    "pct_of_matmul": 100.0 * g_flops / 1e9 / g_s / mm_adjacent,
                }
        res["profile"]["kernel_rates"] = rates
    del model, optimizer, criterion, sample
    gc.collect()
    return res


# --------------------------------------------------------------------------------------
# Data pipeline benchmark


def bench_pipeline(clips: int, passes: int, frames: int, norm: tuple) -> Dict[str, Any]:
    """Per-clip time of load_audio + wav_to_fbank + normalize_fbank with 1 torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    out = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
            for fmt, (rate, channels) in PIPELINE_FORMATS.items():
                paths = []
                for i in range(clips):
                    path = os.path.join(tmp, f"{fmt}_{i}.wav")
                    n = int(CLIP_SECONDS * rate)
                    tone = 0.3 * np.sin(2 * np.pi * (220.0 * (i + 1)) * np.arange(n) / rate)
                    data = tone[:, None] + 0.05 * rng.standard_normal((n, channels))
                    soundfile.write(path, data.astype(np.float32), rate, subtype="PCM_16")
                    paths.append(path)

                def one(path):
                    fb = normalize_fbank(wav_to_fbank(load_audio(path, max_frames=frames), frames), *norm)
                    assert fb.shape == (frames, 128)

                one(paths[0])  # warm-up
                times = []
                for _ in range(passes):
                    for path in paths:
                        t0 = time.perf_counter()
                        one(path)
                        times.append(time.perf_counter() - t0)
                per_clip = median(times)
                out[fmt] = {
                    "sample_rate": rate,
                    "channels": channels,
                    "clip_seconds": CLIP_SECONDS,
                    "ms_per_clip": per_clip * 1e3,
                    "clips_per_s_per_worker": 1.0 / per_clip,
                    "timed_clips": len(times),
                }
                log(f"[pipeline] {fmt}: {per_clip * 1e3:.1f} ms/clip, {1.0 / per_clip:.1f} clips/s per worker")
    finally:
        torch.set_num_threads(threads)
    return out


# --------------------------------------------------------------------------------------
# CLAP teacher


def bench_teacher(batch: int, steps: int, size: str) -> Dict[str, Any]:
    """Forward throughput of the frozen CLAP teacher on 10 s clips (random weights, real shapes)."""
    from mam_clap_plugin.teacher import load_clap_teacher, save_random_clap_checkpoint

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


def print_table(report: Dict[str, Any]) -> None:
    cfg = report["config"]
    mm = report["matmul_reference"]
    log("")
    log(
        f"SupMAM-CLAP pretraining benchmark: size {cfg['size']}, batch {cfg['batch_size']} x {cfg['input_shape'][1:]}, "
        f"{cfg['threads']} threads, {report['machine']['cpu_model']}, torch {report['machine']['torch']}"
    )
    log(
        "fp32 torch.mm GFLOP/s: start "
        + ", ".join(f"{n}^2 {g:.1f}" for n, g in mm["gflops_by_size"].items())
        + "; end "
        + ", ".join(f"{n}^2 {g:.1f}" for n, g in mm.get("gflops_by_size_end", {}).items())
        + f"; best of run {mm['best_gflops']:.1f} ({mm['best_source']})"
    )
    log(
        "%mm = achieved / torch.mm rate sampled before and between that variant's timed steps (mm GFLOP/s column); "
        "%best = achieved / best torch.mm rate of the run"
    )
    head = (
        f"{'variant':<12} {'mask':>4} {'target':>6} {'cls':>3} {'dec':>3} {'params':>7} {'step ms':>9} "
        f"{'AdamW ms':>8} {'clips/s':>7} {'GFLOP/st':>8} {'GFLOP/s':>7} {'mm GF/s':>7} {'%mm':>5} {'%best':>5} {'cpu%':>4} {'>=85%':>5}"
    )
    log(head)
    log("-" * len(head))
    for name, v in report["variants"].items():
        s = v["settings"]
        log(
            f"{name:<12} {s['mask_ratio']:>4} {s['target']:>6} {'y' if s['classification_branch'] else 'n':>3} "
            f"{s['decoder_layers']:>3} {v['params_m']:>6.1f}M {v['step_ms']:>9.0f} {v['optimizer_step_ms']:>8.0f} "
            f"{v['clips_per_s']:>7.3g} {v['gflop_per_step']:>8.4g} {v['achieved_gflops']:>7.1f} "
            f"{v['matmul_gflops']:>7.1f} {v['pct_of_matmul']:>5.1f} {v['pct_of_best_matmul']:>5.1f} "
            f"{v['cpu_utilisation_pct']:>4.0f} {'yes' if v['target_met'] else 'NO':>5}"
        )
    if any("profile" in v for v in report["variants"].values()):
        log("where the time goes (profiler self CPU time over the timed steps):")
    for name, v in report["variants"].items():
        if "profile" in v:
            prof = v["profile"]
            top = ", ".join(f"{o['op'].replace('aten::', '')} {o['share_pct']:.0f}%" for o in prof["top_ops"][:5])
            log(f"  {name:<12} {top}")
            rates = "; ".join(
                f"{g.split(' ')[0]} kernels {r['gflops']:.0f} GFLOP/s ({r['pct_of_matmul']:.0f}% of mm) on "
                f"{100 * r['self_s_per_step'] * 1e3 / v['step_ms']:.0f}% of the step"
                for g, r in prof["kernel_rates"].items()
            )
            log(f"  {'':<12} {rates}")
    pipe = report["pipeline"]
    log("")
    log("data pipeline (load_audio + wav_to_fbank + normalize_fbank, 10 s clips, 1 thread):")
    for fmt, p in pipe["formats"].items():
        log(f"  {fmt:<12} {p['ms_per_clip']:7.1f} ms/clip  {p['clips_per_s_per_worker']:7.1f} clips/s per worker")
    log(f"pipeline clips/s per core / model clips/s per core (target >= {TARGET_PIPELINE_RATIO:.0f}x):")
    for name, ratios in pipe["ratio_to_model_per_core"].items():
        log("  " + f"{name:<12} " + "  ".join(f"{fmt} {r:8.0f}x" for fmt, r in ratios.items()))
    log(f"  worst case {pipe['min_ratio']:.0f}x -> {'met' if pipe['target_met'] else 'NOT met'}")
    if "teacher" in report:
        t = report["teacher"]
        log("")
        log(f"CLAP teacher {t['teacher']} ({t['params_m']:.1f}M, {t['layer']} map {t['grid']}x{t['dim']}), "
            f"batch {t['batch_size']} x {t['clip_seconds']:.0f} s at {t['sample_rate']} Hz: "
            f"{t['batch_ms']:.0f} ms/batch, {t['clips_per_s']:.2f} clips/s (offline extraction rate)")
        for name, c in t["online_cost"].items():
            log(f"  online teacher in {name}: {c['teacher_ms_per_batch']:.0f} ms per batch = "
                f"{100 * c['fraction_of_step']:.0f}% of the training step ({c['step_ms']:.0f} ms student step)")
    log("")
    log(f"matmul target: {report['summary']['matmul_target_verdict']}")
    log(f"               {report['summary']['matmul_target_verdict_vs_best']}")
    log(f"peak RSS {report['peak_rss_mib']:.0f} MiB; total wall {report['wall_s']:.0f} s")


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


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first; the first one counts FLOPs (>= 1)")
    p.add_argument("--size", default=None, help="apply examples/pretraining/config/size/<SIZE>.yaml (e.g. tiny)")
    p.add_argument("--out", default="outputs/bench/pretrain.json")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[2048, 3072, 4096])
    p.add_argument("--matmul-reps", type=int, default=5)
    p.add_argument(
        "--adjacent-sizes", type=int, nargs="+", default=[2048, 3072],
        help="torch.mm sizes sampled before and between each variant's timed steps (the time-matched reference)",
    )
    p.add_argument("--pipeline-clips", type=int, default=4, help="distinct 10 s files per format")
    p.add_argument("--pipeline-passes", type=int, default=3)
    p.add_argument(
        "--adamw-impl", choices=("fused", "foreach", "forloop"), default="fused",
        help="torch.optim.AdamW implementation (fused: one C++ kernel over all parameters; same maths)",
    )
    p.add_argument("--no-profile", dest="profile", action="store_false", help="do not run torch.profiler on the timed steps")
    p.add_argument("--teacher-batch", type=int, default=8, help="clips per teacher batch (0: skip the teacher)")
    p.add_argument("--teacher-steps", type=int, default=3, help="timed teacher batches (median reported)")
    p.add_argument("--teacher-size", choices=("tiny", "small"), default="tiny",
                   help="tiny: HTSAT-tiny shapes (the real teacher); small: a narrow test teacher")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--warmup, --steps and --batch-size must be >= 1")

    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    machine = machine_info()
    log(f"torch {torch.__version__}, {threads} threads, {machine['cpu_model']}, load {machine['loadavg_at_start'][0]:.2f}")

    specs = {name: load_variant(name, args.size) for name in args.variants}
    frames = next(iter(specs.values()))["target_length"]

    mm_sizes = {}
    for n in args.matmul_sizes:
        mm_sizes[str(n)] = matmul_gflops(n, args.matmul_reps)
        log(f"[matmul] {n}x{n} fp32: {mm_sizes[str(n)]:.1f} GFLOP/s")

    pipeline = bench_pipeline(args.pipeline_clips, args.pipeline_passes, frames, resolve_norm_stats(specs[args.variants[0]]["norm_stats"]))

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {
        "schema": "bench_pretrain/1",
        "complete": False,
        "config": {
            "size": args.size or "paper (ViT-B)",
            "variants": args.variants,
            "batch_size": args.batch_size,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "threads": threads,
            "input_shape": [args.batch_size, 1, frames, 128],
            "teacher_target_dim": TEACHER_DIM,
            "teacher_target_dim_note": "random stand-in targets of LAION-CLAP HTSAT-tiny's width (final map, 768); "
                                       "the teacher's own cost is measured separately under 'teacher'",
            "num_classes": NUM_CLASSES,
            "adamw_impl": args.adamw_impl,
            "profiled_timed_steps": args.profile,
        },
        "machine": machine,
        "matmul_reference": {
            "gflops_by_size": mm_sizes,
            "adjacent_sizes": args.adjacent_sizes,
            "reps": args.matmul_reps,
            "threads": threads,
            "dtype": "float32",
        },
        "variants": {},
        "notes": [
            "step = SupMamClapCriterion forward (model + loss) + zero_grad + backward + torch.optim.AdamW step; "
            "median over the timed steps, after the warm-up steps",
            "gflop_forward_by_module: FlopCounterMode's per-module counts of the forward pass only (its module "
            "attribution of backward ops is unreliable); gflop_per_step is the whole forward + backward",
            "FLOPs: torch.utils.flop_counter.FlopCounterMode over forward + backward of the first warm-up step "
            "(matmuls, convolution, attention); CPU flash-attention formulas added because torch registers them only "
            "for the CUDA kernels",
            "pct_of_matmul (headline, target_met) = achieved GFLOP/s / matmul_gflops, the fp32 torch.mm rate "
            "sampled right before and between that variant's timed steps (best size of --adjacent-sizes, median "
            "over its samples, same threads): the machine's speed drifts by tens of percent within minutes (shared "
            "vCPUs, clock boost), so a time-matched reference is the fair comparison",
            "pct_of_best_matmul (target_met_vs_best) = achieved / the highest median torch.mm rate seen anywhere in "
            "the run (sweeps at start and end, samples next to each variant): the conservative bound",
            "profile.kernel_rates: FLOPs counted for the matmul / attention ops divided by their profiled self time; "
            "pct_of_matmul there is relative to the variant's time-matched torch.mm rate",
            "cpu_utilisation_pct = process CPU time / (wall time x threads) over the timed steps; well below 100 "
            "means other processes took CPU time from the benchmark",
            "harness speed-up applied: AdamW(fused=True) (same update maths in one C++ kernel instead of a Python "
            "loop over parameters; --adamw-impl forloop restores torch's CPU default)",
            "torch.profiler (CPU activity only, one profiler per timed step, started before the step's clock) is "
            "active during the timed steps; its per-op cost is microseconds against ops of milliseconds at ViT-B "
            "size (--no-profile to turn it off)",
        ],
    }

    def write():
        apply_matmul_reference(report)
        report["peak_rss_mib"] = peak_rss_mib()
        report["wall_s"] = time.perf_counter() - start
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    for name in args.variants:
        report["variants"][name] = bench_variant(name, specs[name], args)
        v = report["variants"][name]
        log(
            f"[{name}] {v['step_ms']:.0f} ms/step, {v['clips_per_s']:.3f} clips/s, {v['achieved_gflops']:.1f} GFLOP/s "
            f"= {v['pct_of_matmul']:.1f}% of the torch.mm rate measured around its steps ({v['matmul_gflops']:.1f}), "
            f"cpu {v['cpu_utilisation_pct']:.0f}%"
        )
        write()

    mm_end = {}
    for n in args.matmul_sizes:
        mm_end[str(n)] = matmul_gflops(n, args.matmul_reps)
        log(f"[matmul] {n}x{n} fp32 (end of run): {mm_end[str(n)]:.1f} GFLOP/s")
    report["matmul_reference"]["gflops_by_size_end"] = mm_end
    apply_matmul_reference(report)

    ratios = {}
    for name, v in report["variants"].items():
        ratios[name] = {fmt: pf["clips_per_s_per_worker"] / v["clips_per_s_per_core"] for fmt, pf in pipeline.items()}
    min_ratio = min(r for per in ratios.values() for r in per.values())
    report["pipeline"] = {
        "formats": pipeline,
        "threads": 1,
        "ratio_to_model_per_core": ratios,
        "min_ratio": min_ratio,
        "target_ratio": TARGET_PIPELINE_RATIO,
        "target_met": min_ratio >= TARGET_PIPELINE_RATIO,
    }
    report["summary"] = {
        "target_pct_of_matmul": TARGET_PCT_OF_MATMUL,
        "pct_of_matmul": {n: v["pct_of_matmul"] for n, v in report["variants"].items()},
        "pct_of_best_matmul": {n: v["pct_of_best_matmul"] for n, v in report["variants"].items()},
        "all_variants_meet_matmul_target": all(v["target_met"] for v in report["variants"].values()),
        "all_variants_meet_matmul_target_vs_best": all(v["target_met_vs_best"] for v in report["variants"].values()),
        "matmul_target_verdict": matmul_verdict(report["variants"], "pct_of_matmul", "the time-matched torch.mm rate"),
        "matmul_target_verdict_vs_best": matmul_verdict(
            report["variants"], "pct_of_best_matmul", "the best torch.mm rate of the whole run"
        ),
        "pipeline_ratio_target_met": min_ratio >= TARGET_PIPELINE_RATIO,
    }
    if args.teacher_batch > 0:
        report["teacher"] = bench_teacher(args.teacher_batch, args.teacher_steps, args.teacher_size)
        report["teacher"]["online_cost"] = online_teacher_cost(report["teacher"], report["variants"], args.batch_size)
        log(f"[teacher] {report['teacher']['clips_per_s']:.2f} clips/s at batch {args.teacher_batch}")
    report["complete"] = True
    write()
    print_table(report)
    log(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
