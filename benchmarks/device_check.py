"""One-GPU check (sized for an H200, under 8 minutes): the bf16 training step of each paper
variant, ``task.fbank_on_device``'s parity and cost, the teacher's bf16 extraction and the
upstream forward, against a bf16 ``torch.mm`` measured in the same run. Writes a JSON report
after every section (``--out``).

Run it through ``benchmarks/device_check.sh`` (the time limit); CI never runs it. A CPU smoke
run: ``python -m benchmarks.device_check --device cpu --size tiny --batch 2 --steps 1 --warmup 1
--matmul-size 256 --teacher-batch 1 --upstream-batch 1 --fbank-batch 2 --fbank-clips 2``.

* step: fairseq's ``common.bf16`` path as the trainer runs it: the model cast to bf16, the batch's
  float32 tensors cast (offline targets arrive as float16), the criterion's forward, backward,
  fairseq's FP16Optimizer over ``mam_clap_adamw`` (clip_grad_norm, step); random 10.24 s fbanks,
  768-wide targets, 527 classes. FLOPs: ``FlopCounterMode`` over one forward + backward.
* teacher: HTSAT-tiny with random weights in LAION-CLAP's layout, ``autocast_dtype=bfloat16``
  (float32 front end), 10 s clips at 48 kHz.
* upstream: the ViT-B encoder's ``extract_features`` (all hidden states) on 10.24 s fbanks under
  bf16 autocast (the fbank itself is computed on the CPU by the upstream and not timed here).
* fbank on the device: generated 10 s 44.1 kHz stereo clips, decoded by ``MamClapDataset``
  with ``fbank_on_device`` (the workers' part), then ``on_device`` on the device (resampling,
  fbank, normalisation) at ``--fbank-batch``; its largest difference from the workers' CPU path
  (limit 1e-4) and its cost per batch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import fairseq  # noqa: F401  (must be imported before the plugin registers its components)
import numpy as np
import torch
from fairseq import optim
from fairseq.utils import apply_to_sample
from torch.utils.flop_counter import FlopCounterMode

import mam_clap_plugin  # noqa: F401  (registers mam_clap_adamw)
from benchmarks.bench_optimizer import build_model, compose_config, fairseq_config
from benchmarks.data_pipeline import pipeline_dataset, write_format_set
from benchmarks.machine import machine_info
from benchmarks.measure import write_report
from mam_clap_fixtures.clap import save_random_clap_checkpoint
from mam_clap_plugin.criterions.supmam_clap import SupMamClapCriterion, SupMamClapCriterionConfig
from mam_clap_plugin.data.audio import NORM_STATS
from mam_clap_plugin.data.dataset import on_device
from mam_clap_plugin.modules.encoder import AudioEncoder

VARIANTS = ("mam", "mam_clap", "supmam", "supmam_clap")
TARGET_PCT_OF_MATMUL = 40.0
FBANK_PARITY_LIMIT = 1e-4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> List[float]:
    """Seconds of each timed call of ``fn`` (device synchronised around each)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def matmul_tflops(n: int, device: torch.device, reps: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = statistics.median(timed(lambda: a @ b, device, 2, reps))
    return 2 * n**3 / seconds / 1e12


def variant_step(name: str, args, device: torch.device) -> Dict[str, Any]:
    cfg = compose_config(name, args.size)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).to(torch.bfloat16)  # what common.bf16 does to the model
    model.train()
    crit_cfg = {k: v for k, v in cfg.criterion.items() if k != "_name"}
    criterion = SupMamClapCriterion(SupMamClapCriterionConfig(**crit_cfg), task=None).train()
    full = fairseq_config(cfg, "mam_clap_adamw", bf16=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optim.FP16Optimizer.build_optimizer(full, params)
    m = model.cfg
    frames = int(m.max_frames)
    tokens = frames // 16 * 8
    g = torch.Generator(device="cpu").manual_seed(0)
    sample = {
        "id": torch.arange(args.batch, device=device), "nsentences": args.batch,
        "net_input": {"source": torch.randn(args.batch, 1, frames, 128, generator=g).to(device, torch.bfloat16)},
    }
    if m.target == "clap":
        sample["target"] = torch.randn(args.batch, tokens, m.target_dim, generator=g).to(device, torch.float16)
    if m.classification_branch:
        sample["label"] = torch.nn.functional.one_hot(
            torch.arange(args.batch) % m.num_classes, m.num_classes).to(device, torch.bfloat16)

    def step():
        opt.zero_grad()
        loss, _, _ = criterion(model, sample)
        opt.backward(loss)
        opt.clip_grad_norm(0.0)
        opt.step()

    with FlopCounterMode(display=False) as counter:
        loss, _, _ = criterion(model, sample)
        loss.backward()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, args.warmup, args.steps)
    step_s = statistics.median(seconds)
    out = {
        "batch": args.batch, "params_m": sum(p.numel() for p in params) / 1e6, "step_ms": 1e3 * step_s,
        "step_ms_all": [1e3 * s for s in seconds], "clips_per_s": args.batch / step_s,
        "tflop_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    model = opt = sample = None  # free the memory before empty_cache (the closure above names them)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def fbank_on_device_check(args, device: torch.device) -> Dict[str, Any]:
    """``task.fbank_on_device`` on ``device``: a batch of ``--fbank-batch`` clips (``--fbank-clips``
    distinct 10 s 44.1 kHz stereo files, repeated) through ``on_device``; parity with the workers'
    CPU fbank on the distinct clips, and ms per batch."""
    frames, norm = 1024, NORM_STATS["audioset"]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_format_set(tmp, "44k1_stereo", 44100, 2, args.fbank_clips, np.random.default_rng(0))
        workers, decoded = (pipeline_dataset(manifest, frames, norm, mode) for mode in (False, True))
        distinct = min(args.fbank_clips, args.fbank_batch)
        reference = workers.collater([workers[i] for i in range(distinct)])["net_input"]["source"]
        raw = decoded.collater([decoded[i % args.fbank_clips] for i in range(args.fbank_batch)])
    batch = apply_to_sample(lambda t: t.to(device), {k: v for k, v in raw.items() if k != "target"})
    finish = lambda: on_device(dict(batch), frames, *norm, decoded.alignment)  # noqa: E731
    seconds = statistics.median(timed(finish, device, 2, args.steps))
    diff = (finish()["net_input"]["source"][:distinct].cpu() - reference).abs().max().item()
    return {"format": "44.1 kHz stereo, 10 s", "batch": args.fbank_batch, "batch_ms": 1e3 * seconds,
            "clips_per_s": args.fbank_batch / seconds, "max_abs_diff_vs_workers": diff,
            "parity_limit": FBANK_PARITY_LIMIT, "parity_met": diff <= FBANK_PARITY_LIMIT}


def teacher_extraction(args, device: torch.device) -> Dict[str, Any]:
    from mam_clap_plugin.teacher import load_clap_teacher

    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_clap_checkpoint(os.path.join(tmp, "clap.pt"), "laion", "tiny")
        teacher = load_clap_teacher(path, "final").to(device)
    teacher.autocast_dtype = torch.bfloat16
    wav = 0.1 * torch.randn(args.teacher_batch, teacher.num_samples, device=device)
    seconds = statistics.median(timed(lambda: teacher(wav), device, 1, args.steps))
    return {"teacher": teacher.name, "dtype": "bf16 (float32 front end)", "batch": args.teacher_batch,
            "batch_ms": 1e3 * seconds, "clips_per_s": args.teacher_batch / seconds}


def upstream_forward(args, device: torch.device) -> Dict[str, Any]:
    cfg = compose_config("mam", args.size)
    encoder = AudioEncoder.from_model_config(cfg.model).to(device).eval()
    frames = int(cfg.model.max_frames)
    fbank = torch.randn(args.upstream_batch, 1, frames, 128, device=device)

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            encoder.extract_features(fbank)

    seconds = statistics.median(timed(forward, device, 1, args.steps))
    audio_s = args.upstream_batch * frames / 100
    return {"batch": args.upstream_batch, "frames": frames, "batch_ms": 1e3 * seconds,
            "audio_seconds_per_s": audio_s / seconds, "note": "encoder only; the upstream's CPU fbank is not timed"}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--size", default=None, help="examples/pretraining/config/size/<SIZE>.yaml (tiny: smoke run)")
    p.add_argument("--batch", type=int, default=128, help="clips per training step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--teacher-batch", type=int, default=64)
    p.add_argument("--upstream-batch", type=int, default=64)
    p.add_argument("--fbank-batch", type=int, default=128, help="clips per on_device batch (fbank_on_device)")
    p.add_argument("--fbank-clips", type=int, default=8, help="distinct generated 44.1 kHz stereo files")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this")
    p.add_argument("--out", default="outputs/device_check.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible (use --device cpu for a smoke run)")
    start = time.perf_counter()
    report: Dict[str, Any] = {
        "schema": "device_check/1", "complete": False, "machine": machine_info(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": vars(args), "variants": {}, "skipped": [],
    }
    def write():
        report["wall_s"] = time.perf_counter() - start
        write_report(report, args.out)

    mm = [matmul_tflops(args.matmul_size, device, 10)]
    report["matmul_bf16_tflops"] = mm[0]
    log(f"bf16 torch.mm {args.matmul_size}^3: {mm[0]:.1f} TFLOP/s")
    write()
    sections = [(f"variant:{v}", lambda v=v: variant_step(v, args, device)) for v in args.variants]
    sections += [("fbank_on_device", lambda: fbank_on_device_check(args, device)),
                 ("teacher", lambda: teacher_extraction(args, device)),
                 ("upstream", lambda: upstream_forward(args, device))]
    for key, run in sections:
        if time.perf_counter() - start > args.budget_s:
            report["skipped"].append(key)
            log(f"[{key}] skipped: time budget spent")
            continue
        result = run()
        if key.startswith("variant:"):
            mm.append(matmul_tflops(args.matmul_size, device, 5))  # time-matched reference
            result["matmul_tflops_next_to_it"] = mm[-1]
            result["pct_of_matmul"] = 100 * result["achieved_tflops"] / max(mm)
            result["target_met"] = result["pct_of_matmul"] >= TARGET_PCT_OF_MATMUL
            report["variants"][key.split(":", 1)[1]] = result
            log(f"[{key}] {result['step_ms']:.0f} ms/step, {result['clips_per_s']:.1f} clips/s, "
                f"{result['achieved_tflops']:.1f} TFLOP/s = {result['pct_of_matmul']:.0f}% of bf16 mm")
        else:
            report[key] = result
            log(f"[{key}] {json.dumps(result)}")
        write()
    report["matmul_bf16_tflops_best"] = max(mm)
    report["complete"] = not report["skipped"]
    write()
    print(json.dumps({k: report[k] for k in ("device", "matmul_bf16_tflops_best", "complete", "wall_s")}))
    return report


if __name__ == "__main__":
    main()
