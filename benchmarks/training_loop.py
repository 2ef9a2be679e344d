"""The real training loop, measured: clips/s that ``fairseq-hydra-train`` itself reports for a
pretraining config, next to the isolated training step (:mod:`benchmarks.student_step`) of the
same variant and batch size, so the gap between the two is visible.

The loop runs as a user runs it (:func:`mam_clap_plugin.hydra_runs.run_hydra_train`): the
variant's YAML (ViT-B unless ``--size``), generated 10 s clips at 16 kHz (tone + noise) with
labels and, for the CLAP variants, a random fp16 target store of LAION-CLAP's final-map shape
(2 x 32 x 768), ``dataset.num_workers`` > 0, ``common.log_interval=1``, no validation, no
checkpoint. The criterion logs ``ntokens`` = clips, so fairseq's ``wps`` is clips/s; the report
takes the updates after ``--skip`` warm-up updates: clips over the time between the first and
last timed update's log lines (the headline; millisecond timestamps), fairseq's ``wps`` and ``ups`` (medians; fairseq
rounds them to 0.1 and 0.01, coarse at ViT-B speed on a CPU) and ``train_wall``, the time
inside fairseq's ``train_step``.

    python -m benchmarks.training_loop --out outputs/bench/training_loop.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import tempfile
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from benchmarks.data_pipeline import CLIP_SECONDS, write_random_store, write_tone_clips
from benchmarks.measure import log, median, write_report
from benchmarks.student_step import CONFIG_DIR, NUM_CLASSES, VARIANTS, bench_variant, load_variant
from mam_clap_plugin.data.manifest import write_class_list, write_labels, write_manifest
from mam_clap_plugin.hydra_runs import run_hydra_train

TARGET_PCT_OF_ISOLATED = 90.0


def write_clips(root: str, clips: int, seed: int = 0) -> None:
    """``root/{train,valid}.tsv`` over the same 10 s 16 kHz clips, labels over 527 classes,
    classes.txt and random target stores in ``root/targets``."""
    rng = np.random.default_rng(seed)
    audio = os.path.join(root, "audio")
    os.makedirs(audio, exist_ok=True)
    os.makedirs(os.path.join(root, "targets"), exist_ok=True)
    names = write_tone_clips(audio, "clip", clips, 16000, 1, rng)
    labels = [[int(c) for c in rng.choice(NUM_CLASSES, 2, replace=False)] for _ in names]
    write_class_list(os.path.join(root, "classes.txt"), [f"class_{k}" for k in range(NUM_CLASSES)])
    for split in ("train", "valid"):
        write_manifest(os.path.join(root, f"{split}.tsv"), audio, names, [int(CLIP_SECONDS * 16000)] * clips)
        write_labels(os.path.join(root, f"{split}.lbl"), labels)
        write_random_store(os.path.join(root, "targets", f"{split}.tgt"), clips, rng)


_TRAIN_INNER = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[\w.]+\]\[INFO\] - \{.*\"num_updates\": \"(\d+)\"")


def update_times(text: str) -> Dict[int, float]:
    """Log time in seconds (millisecond resolution) of each ``train_inner`` record, by update;
    fairseq's own ``wall`` field is rounded to whole seconds."""
    times = {}
    for line in text.splitlines():
        m = _TRAIN_INNER.match(line)
        if m and "train_inner" in line.split(" - ", 1)[0]:
            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times[int(m.group(2))] = stamp.timestamp()
    return times


def loop_figures(records: List[dict], times: Dict[int, float], skip: int) -> Dict[str, Any]:
    """clips/s of the logged updates after the first ``skip``: the log clock, fairseq's wps/ups."""
    timed = [r for r in records if int(r["num_updates"]) > skip]
    if len(timed) < 2:
        raise RuntimeError(f"need at least 2 logged updates after {skip} warm-up updates, got {len(timed)}")
    clips = sum(r["bsz"] for r in timed[1:])
    wall = times[int(timed[-1]["num_updates"])] - times[int(timed[0]["num_updates"])]
    return {
        "timed_updates": len(timed),
        "wps_all": [r["wps"] for r in timed],
        "clips_per_s_wps": median([r["wps"] for r in timed]),
        "clips_per_s_wall": clips / wall,
        "ups": median([r["ups"] for r in timed]),
        # seconds inside fairseq's train_step per logged update (log_interval=1, whole seconds): the rest of
        # ms_per_update_wall is the loop around it (waiting for data, logging)
        "ms_in_train_step": 1e3 * median([r["train_wall"] for r in timed]),
        "ms_per_update_wall": 1e3 * wall / (len(timed) - 1),
        "bsz": timed[-1]["bsz"],
    }


def bench_loop(variant: str, size: Optional[str], batch_size: int, updates: int, workers: int, skip: int,
               root: str, threads: Optional[int]) -> Dict[str, Any]:
    write_clips(os.path.join(root, "data"), batch_size * updates)
    data = os.path.join(root, "data")
    overrides = [
        f"task.data={data}", "common.cpu=true", "common.log_interval=1", f"dataset.batch_size={batch_size}",
        f"dataset.num_workers={workers}", "optimization.update_freq=[1]", f"optimization.max_update={updates}",
        "lr_scheduler.warmup_updates=1", "dataset.disable_validation=true", "checkpoint.no_save=true",
    ]
    if "clap" in variant:
        overrides.append(f"task.target_store={os.path.join(data, 'targets')}")
    if size:
        overrides.append(f"+size={size}")
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    t0 = time.perf_counter()
    run = run_hydra_train(str(CONFIG_DIR), variant, overrides, os.path.join(root, "run"), env=env)
    figures = loop_figures(run.records["train_inner"], update_times(run.text), skip)
    figures.update(command_overrides=overrides, process_wall_s=time.perf_counter() - t0, num_workers=workers)
    log(f"[loop] {variant}: fairseq-hydra-train {figures['clips_per_s_wps']:.3f} clips/s (wps), "
        f"{figures['clips_per_s_wall']:.3f} clips/s (wall), {figures['ms_per_update_wall']:.0f} ms/update, "
        f"{figures['ms_in_train_step']:.0f} ms of it in train_step")
    return figures


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="supmam_clap", choices=VARIANTS)
    p.add_argument("--size", default=None, help="apply examples/pretraining/config/size/<SIZE>.yaml (e.g. tiny)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--updates", type=int, default=6, help="updates of the fairseq-hydra-train run")
    p.add_argument("--skip", type=int, default=1, help="first updates left out (warm-up)")
    p.add_argument("--num-workers", type=int, default=1, help="dataset.num_workers of the run (> 0)")
    p.add_argument("--steps", type=int, default=3, help="timed isolated steps (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of both (default: torch's choice)")
    p.add_argument("--out", default="outputs/bench/training_loop.json")
    args = p.parse_args(argv)
    if args.num_workers < 1 or args.updates < args.skip + 2:
        p.error("--num-workers must be >= 1 and --updates >= --skip + 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        loop = bench_loop(args.variant, args.size, args.batch_size, args.updates, args.num_workers, args.skip, tmp,
                          args.threads)
    step_args = SimpleNamespace(batch_size=args.batch_size, steps=args.steps, warmup=1, adamw_impl="fused",
                                profile=False, adjacent_sizes=[512], matmul_reps=2)
    isolated = bench_variant(args.variant, load_variant(args.variant, args.size), step_args)
    pct = 100.0 * loop["clips_per_s_wall"] / isolated["clips_per_s"]
    report = {
        "schema": "training_loop/1",
        "variant": args.variant,
        "size": args.size or "paper (ViT-B)",
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "loop": loop,
        "isolated_step": {k: isolated[k] for k in ("step_ms", "fwd_loss_bwd_ms", "optimizer_step_ms", "clips_per_s")},
        "isolated_step_optimizer": "torch.optim.AdamW(fused=True); the loop uses the config's optimizer",
        "loop_pct_of_isolated": pct,
        "target_pct": TARGET_PCT_OF_ISOLATED,
        "target_met": pct >= TARGET_PCT_OF_ISOLATED,
        "wall_s": time.perf_counter() - start,
    }
    out = write_report(report, args.out)
    log(f"{args.variant} ({report['size']}), batch {args.batch_size}: fairseq-hydra-train "
        f"{loop['clips_per_s_wall']:.3f} clips/s ({loop['ms_per_update_wall']:.0f} ms/update, wps "
        f"{loop['clips_per_s_wps']:.3f}) vs isolated step {isolated['clips_per_s']:.3f} clips/s "
        f"({isolated['step_ms']:.0f} ms): {pct:.0f}% (target >= {TARGET_PCT_OF_ISOLATED:.0f}%) -> "
        f"{'met' if report['target_met'] else 'NOT met'}")
    log(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
