"""Optimizer step time on a paper model: fairseq's ``adam`` against the plugin's ``mam_clap_adamw``.

One "update" is what fairseq's trainer does after backward: ``clip_grad_norm(clip_norm)``
(called even at ``clip_norm: 0``, for the logged gnorm) then ``step()``. Both optimizers
are built by fairseq's registry from the paper config
(``examples/pretraining/config/<variant>.yaml``, composed by Hydra), with
the config's betas, eps and weight decay, over the same model's parameters and fixed
random gradients. The model is the variant's (default: MAM, ViT-B with AudioMAE's
16-block decoder, 136 M parameters). Median over the timed updates, after warm-up updates
(the first builds the optimizer state), the two optimizers interleaved.

Writes a JSON report (``--out``) and prints a table. From the repository root:
    python -m benchmarks.bench_optimizer --out outputs/bench/optimizer.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import fairseq  # noqa: F401  (must be imported before the plugin registers its components)
import torch
from fairseq import optim
from fairseq.dataclass.configs import FairseqConfig
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import mam_clap_plugin  # noqa: F401  (registers mam_clap_adamw)
from benchmarks.machine import machine_info
from benchmarks.measure import write_report
from mam_clap_plugin.models.supmam_clap import SupMamClapModel

CONFIG_DIR = Path(__file__).resolve().parents[1] / "examples" / "pretraining" / "config"
OPTIMIZERS = ("adam", "mam_clap_adamw")
TARGET_SPEEDUP = 2.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compose_config(variant: str, size: Optional[str]):
    """The variant's config file composed by Hydra (its defaults list and ``+size=...``)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=variant, overrides=[f"+size={size}"] if size else [])
    if "_group_" in cfg:  # a file headed ``# @package _group_`` lands there; ``size`` at the root
        rest = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "_group_"])
        cfg = OmegaConf.merge(cfg._group_, rest)
    return cfg


def build_model(cfg) -> SupMamClapModel:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_name", None)
    if model_cfg["target"] == "clap" and model_cfg["target_dim"] <= 0:
        model_cfg["target_dim"] = 768  # LAION-CLAP HTSAT-tiny's final map width
    if model_cfg["classification_branch"] and model_cfg["num_classes"] <= 0:
        model_cfg["num_classes"] = 527  # AudioSet
    return SupMamClapModel(OmegaConf.create(model_cfg))


def fairseq_config(cfg, name: str, **common):
    """A full fairseq config holding cfg.optimizer as the named optimizer's node (same betas, eps,
    weight decay and lr) and the given ``common.*`` flags (e.g. ``bf16=True``)."""
    spec = {k: cfg.optimizer[k] for k in ("adam_betas", "adam_eps", "weight_decay")}
    full = OmegaConf.structured(FairseqConfig())  # for the common.* / optimization.lr interpolations
    with open_dict(full):
        full.optimization.lr = list(cfg.optimization.lr)
        full.optimizer = OmegaConf.merge(
            OmegaConf.structured(optim.OPTIMIZER_DATACLASS_REGISTRY[name]()), {"_name": name, **spec}
        )
        for key, value in common.items():
            full.common[key] = value
    return full


def time_update(opt, clip_norm: float) -> Dict[str, float]:
    t0 = time.perf_counter()
    opt.clip_grad_norm(clip_norm)
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    return {"update_ms": 1e3 * (t2 - t0), "clip_grad_norm_ms": 1e3 * (t1 - t0), "step_ms": 1e3 * (t2 - t1)}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="mam", choices=("mam", "mam_clap", "supmam", "supmam_clap"))
    p.add_argument("--size", default=None, help="apply examples/pretraining/config/size/<SIZE>.yaml (e.g. tiny)")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first (>= 1; the first builds the state)")
    p.add_argument("--steps", type=int, default=6, help="timed updates per optimizer (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default="outputs/bench/optimizer.json")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()  # load average at the start

    cfg = compose_config(args.variant, args.size)
    torch.manual_seed(0)
    model = build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    clip_norm = float(cfg.optimization.clip_norm)
    log(
        f"{args.variant} ({args.size or 'paper size'}): {sum(p.numel() for p in params) / 1e6:.1f} M parameters in "
        f"{len(params)} tensors, clip_norm {clip_norm:g}, {torch.get_num_threads()} threads"
    )

    for p_, g in zip(params, grads):
        p_.grad = g
    opts = {name: optim.build_optimizer(fairseq_config(cfg, name).optimizer, params) for name in OPTIMIZERS}
    # interleaved rounds (the order alternating), so that both see the same machine load
    samples: Dict[str, List[Dict[str, float]]] = {name: [] for name in OPTIMIZERS}
    for i in range(args.warmup + args.steps):
        for name in OPTIMIZERS if i % 2 == 0 else OPTIMIZERS[::-1]:
            t = time_update(opts[name], clip_norm)
            if i >= args.warmup:
                samples[name].append(t)
        log(f"round {i + 1}/{args.warmup + args.steps}" + (" (warm-up)" if i < args.warmup else "") + ": " + ", ".join(
            f"{name} {samples[name][-1]['update_ms']:.0f} ms" for name in OPTIMIZERS if i >= args.warmup))
    results = {}
    for name, opt in opts.items():
        results[name] = {
            "class": f"{type(opt.optimizer).__module__}.{type(opt.optimizer).__qualname__}",
            "param_groups": len(opt.param_groups),
            **{k: statistics.median(t[k] for t in samples[name]) for k in samples[name][0]},
            "update_ms_all": [t["update_ms"] for t in samples[name]],
        }
        r = results[name]
        log(f"[{name}] {r['update_ms']:.1f} ms per update (clip_grad_norm {r['clip_grad_norm_ms']:.1f}, "
            f"step {r['step_ms']:.1f}) with {r['class']}")
    ratios = [a["update_ms"] / b["update_ms"] for a, b in zip(samples["adam"], samples["mam_clap_adamw"])]

    speedup = results["adam"]["update_ms"] / results["mam_clap_adamw"]["update_ms"]
    round_speedup = statistics.median(ratios)
    report = {
        "schema": "bench_optimizer/1",
        "config": {
            "variant": args.variant,
            "size": args.size or "paper (ViT-B)",
            "params_m": sum(p.numel() for p in params) / 1e6,
            "tensors": len(params),
            "clip_norm": clip_norm,
            "optimizer": {k: cfg.optimizer[k] for k in ("adam_betas", "adam_eps", "weight_decay")},
            "warmup": args.warmup,
            "steps": args.steps,
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "machine": machine,
        "optimizers": results,
        "speedup": speedup,
        "speedup_per_round_median": round_speedup,
        "target_speedup": TARGET_SPEEDUP,
        "target_met": min(speedup, round_speedup) >= TARGET_SPEEDUP,
        "notes": [
            "update = optimizer.clip_grad_norm(clip_norm) + optimizer.step(), as fairseq's trainer calls them "
            "after backward; fixed random gradients, parameters updated in place",
            "adam: fairseq's FairseqAdam; without apex or CUDA it is fairseq.optim.adam.Adam, a Python loop over "
            "tensors; its clip_grad_norm is fairseq.utils.clip_grad_norm_ (one norm per tensor without apex)",
            "mam_clap_adamw: torch.optim.AdamW(fused=True) over the plugin's parameter groups, foreach norms",
            "rounds interleave the two optimizers (order alternating) over the same parameters and gradients; "
            "speedup = ratio of the medians, speedup_per_round_median = median of the per-round ratios; the target "
            "counts as met when both are >= the target",
        ],
        "loadavg_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - start,
    }
    out = write_report(report, args.out)
    print("| optimizer | update ms | clip_grad_norm ms | step ms |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['update_ms']:.1f} | {r['clip_grad_norm_ms']:.1f} | {r['step_ms']:.1f} |")
    verdict = "met" if report["target_met"] else "NOT met"
    print(f"speed-up {speedup:.2f}x (per-round median {round_speedup:.2f}x; target >= {TARGET_SPEEDUP:g}x: "
          f"{verdict}); report: {out}; {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
