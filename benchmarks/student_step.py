"""One SupMAM-CLAP training step per variant: build the variant from its YAML, time the steps.

The model and criterion settings come from ``examples/pretraining/config/<variant>.yaml``
(plus ``size/<size>.yaml`` with ``--size``), read with omegaconf; the model is built
directly as ``SupMamClapModel(SupMamClapConfig(**cfg.model))``, the loss is the real
``SupMamClapCriterion``, the optimiser is ``torch.optim.AdamW`` with the YAML's lr, betas,
eps and weight decay. Inputs: random normalised fbank (B, 1, task.target_length, 128),
random teacher tokens (B, N, 768) for the CLAP targets, random multi-hot labels over 527
classes. One step = criterion forward + zero_grad + backward + AdamW step.
"""
from __future__ import annotations

import ast
import contextlib
import gc
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import cpu_sdpa_flop_mapping, flops_by_module
from benchmarks.matmul import TARGET_PCT_OF_MATMUL, matmul_samples
from benchmarks.measure import log, median, peak_rss_mib
from benchmarks.profiling import ProfileTotals, op_group
from mam_clap_plugin.criterions.supmam_clap import SupMamClapCriterion, SupMamClapCriterionConfig
from mam_clap_plugin.hydra_runs import compose_config
from mam_clap_plugin.models.supmam_clap import SupMamClapConfig, SupMamClapModel
from mam_clap_plugin.modules.encoder import num_visible

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "examples" / "pretraining" / "config"
VARIANTS = ("mam", "mam_clap", "supmam", "supmam_clap")
TEACHER_DIM = 768  # teacher token width for target=clap: LAION-CLAP HTSAT-tiny's final map
NUM_CLASSES = 527  # AudioSet classes for the classification branch


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
        note = " (FLOP count)" if i == 0 else ""
        log(f"[{name}] warm-up {i + 1}/{args.warmup}{note}: {total:.2f} s, loss {loss:.4f}")
    flops = counter.get_total_flops()
    global_counts = counter.get_flop_counts().get("Global", {})
    flops_by_op = {str(k).replace("aten.", "aten::", 1): v for k, v in global_counts.items()}
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
        log(f"[{name}] step {i + 1}/{args.steps}: {total:.2f} s (fwd+loss+bwd {fb:.2f} s, AdamW {op:.3f} s), "
            f"loss {loss:.4f}")
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
    model = optimizer = criterion = sample = None  # free the memory (the closure above still names them)
    gc.collect()
    return res
