"""The data path, as the training loop runs it, on 10 s clips at 44.1 kHz stereo, 48 kHz stereo
and 16 kHz mono:

* worker side: ``MamClapDataset.__getitem__`` (read and downmix; plus resampling, the fbank
  and its normalisation unless ``task.fbank_on_device``; plus the clip's offline target map),
  per clip, in one process with 1 torch thread (one DataLoader worker);
* device side: ``data.dataset.on_device`` on a collated batch (with ``fbank_on_device`` the
  batch's resampling, fbank and normalisation; and the offline targets' alignment), on this
  process's device (the CPU here, with torch's threads) -- what ``train_step`` adds before the model;
* bytes per clip that cross the loader: the fbank, the waveform at the file's own rate
  (``fbank_on_device``), the offline targets (the store's fp16 map) next to the aligned fp32
  tokens they replace;
* workers needed per 1000 clips/s of accelerator throughput, in each mode.

Run alone (quick): ``python -m benchmarks.data_pipeline --out outputs/bench/data_pipeline.json``;
``benchmarks.bench_pretrain`` runs it too and relates it to the model's clips/s.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from benchmarks.measure import log, median, write_report
from mam_clap_plugin.data.audio import resolve_norm_stats, write_wav
from mam_clap_plugin.data.dataset import MamClapDataset, on_device
from mam_clap_plugin.data.manifest import read_manifest, write_manifest
from mam_clap_plugin.data.target_store import TargetStoreHeader, create_target_store, open_target_store
from mam_clap_plugin.modules.encoder import PATCH_SIZE

TARGET_PIPELINE_RATIO = 10.0
TARGET_ON_DEVICE_SPEEDUP = 2.0  # worker side, 44.1 kHz stereo, fbank_on_device vs the workers' fbank
CLIP_SECONDS = 10.0
PIPELINE_FORMATS = {  # name -> (sample rate, channels)
    "44k1_stereo": (44100, 2),
    "48k_stereo": (48000, 2),
    "16k_mono": (16000, 1),
}
#: LAION-CLAP HTSAT-tiny's final map: 2 bands x 32 time cells x 768 (the offline store's clip).
TEACHER_GRID, TEACHER_DIM = (2, 32), 768
#: The issue's estimate of an H200's ViT-B SupMAM-CLAP rate (40% of bf16 peak; not measured here).
GPU_CLIPS_PER_S_ESTIMATE = 1300.0
MODES = ("fbank_in_worker", "fbank_on_device")


def write_tone_clips(directory: str, prefix: str, clips: int, rate: int, channels: int, rng) -> List[str]:
    """``clips`` 10 s tone + noise WAV files ``{prefix}_{i}.wav``; returns their names."""
    names = []
    n = int(CLIP_SECONDS * rate)
    for i in range(clips):
        tone = 0.3 * np.sin(2 * np.pi * (110.0 * (i % 8 + 1)) * np.arange(n) / rate)
        data = tone[:, None] + 0.05 * rng.standard_normal((n, channels))
        names.append(f"{prefix}_{i}.wav")
        write_wav(os.path.join(directory, names[-1]), data.astype(np.float32), rate)
    return names


def write_random_store(path: str, clips: int, rng) -> None:
    """A complete fp16 target store of random LAION-CLAP final maps (2 x 32 x 768 per clip)."""
    header = TargetStoreHeader(teacher="benchmark-random", checkpoint_sha256="0" * 64, layer="final", projection=False,
                               grid_freq=TEACHER_GRID[0], grid_time=TEACHER_GRID[1], dim=TEACHER_DIM,
                               sample_rate=48000, seconds=10.0, freq_edges_hz=[50.0, 2229.63, 14000.0],
                               num_clips=clips)
    with create_target_store(path, header) as writer:
        for i in range(clips):
            writer.write(i, rng.standard_normal((*TEACHER_GRID, TEACHER_DIM)).astype(np.float32))


def write_format_set(root: str, fmt: str, rate: int, channels: int, clips: int, rng) -> str:
    """Clips of one format, their manifest and a random target store; returns the manifest."""
    names = write_tone_clips(root, fmt, clips, rate, channels, rng)
    manifest = os.path.join(root, f"{fmt}.tsv")
    write_manifest(manifest, root, names, [int(CLIP_SECONDS * rate)] * clips)
    write_random_store(os.path.join(root, f"{fmt}.tgt"), clips, rng)
    return manifest


def pipeline_dataset(manifest: str, frames: int, norm: tuple, fbank_on_device: bool) -> MamClapDataset:
    store = open_target_store(manifest[: -len(".tsv")] + ".tgt")
    return MamClapDataset(read_manifest(manifest), target_length=frames, norm_mean=norm[0], norm_std=norm[1],
                          target_store=store, alignment=store.header.alignment(frames // PATCH_SIZE, 8),
                          shuffle=False, fbank_on_device=fbank_on_device)


def _time_items(dataset: MamClapDataset, passes: int) -> List[float]:
    dataset[0]  # warm-up: resampling kernel, mel matrix, file cache
    times = []
    for _ in range(passes):
        for i in range(len(dataset)):
            t0 = time.perf_counter()
            dataset[i]
            times.append(time.perf_counter() - t0)
    return times


def _item_bytes(item: Dict[str, Any]) -> Dict[str, int]:
    """Bytes of the tensors an item sends through the loader (inputs and offline targets)."""
    inputs = item["audio"] if "audio" in item else item["source"]
    extra = 8 + 8 if "audio" in item else 0  # the clip's length (int64) and rate (an int) in the batch
    return {"input": inputs.numel() * inputs.element_size() + extra,
            "target": item["target"].numel() * item["target"].element_size()}


def bench_worker_side(clips: int, passes: int, frames: int, norm: tuple, root: str, rng) -> Dict[str, Any]:
    """Per-clip worker cost of each format in both modes (1 torch thread), and the bytes per item."""
    out = {}
    for fmt, (rate, channels) in PIPELINE_FORMATS.items():
        manifest = write_format_set(root, fmt, rate, channels, clips, rng)
        entry: Dict[str, Any] = {"sample_rate": rate, "channels": channels, "clip_seconds": CLIP_SECONDS}
        for mode in MODES:
            dataset = pipeline_dataset(manifest, frames, norm, mode == "fbank_on_device")
            per_clip = median(_time_items(dataset, passes))
            entry[mode] = {"ms_per_clip": per_clip * 1e3, "clips_per_s_per_worker": 1.0 / per_clip,
                           "bytes_per_clip": _item_bytes(dataset[0]), "timed_clips": passes * clips}
            log(f"[pipeline] {fmt} {mode}: {per_clip * 1e3:.1f} ms/clip, {1.0 / per_clip:.1f} clips/s per worker")
        # the workers' fbank mode keeps the report's original fields at the top level
        entry["ms_per_clip"] = entry["fbank_in_worker"]["ms_per_clip"]
        entry["clips_per_s_per_worker"] = entry["fbank_in_worker"]["clips_per_s_per_worker"]
        entry["timed_clips"] = entry["fbank_in_worker"]["timed_clips"]
        on_device = entry["fbank_on_device"]["clips_per_s_per_worker"]
        entry["on_device_speedup"] = on_device / entry["clips_per_s_per_worker"]
        out[fmt] = entry
    return out


def bench_device_side(batch_size: int, passes: int, frames: int, norm: tuple, root: str) -> Dict[str, Any]:
    """``on_device`` on one collated batch of 44.1 kHz stereo clips: resampling + fbank +
    normalisation (``fbank_on_device``) and the offline targets' alignment, each timed alone."""
    dataset = pipeline_dataset(os.path.join(root, "44k1_stereo.tsv"), frames, norm, True)
    batch = dataset.collater([dataset[i % len(dataset)] for i in range(batch_size)])
    device = torch.device("cpu")
    parts = {
        "resample_fbank_and_normalisation": {k: v for k, v in batch.items() if k != "target"},
        "offline_target_alignment": {"target": batch["target"]},
    }
    out: Dict[str, Any] = {"batch_size": batch_size, "device": str(device), "threads": torch.get_num_threads()}
    for name, part in parts.items():
        on_device(dict(part), frames, *norm, dataset.alignment)  # warm-up: mel matrix, index on the device
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            on_device(dict(part), frames, *norm, dataset.alignment)
            times.append(time.perf_counter() - t0)
        ms = median(times) * 1e3
        out[name] = {"ms_per_batch": ms, "ms_per_clip": ms / batch_size}
        log(f"[pipeline] device side ({device}, {out['threads']} threads), {name}: "
            f"{ms:.1f} ms per batch of {batch_size}")
    return out


def loader_bytes(formats: Dict[str, Any], frames: int) -> Dict[str, Any]:
    """Bytes per clip that cross the loader, from the measured items (44.1 kHz stereo)."""
    entry = formats["44k1_stereo"]
    tokens = (frames // PATCH_SIZE) * 8
    store_clip = TEACHER_GRID[0] * TEACHER_GRID[1] * TEACHER_DIM * 2
    target = entry["fbank_in_worker"]["bytes_per_clip"]["target"]
    return {
        "fbank": entry["fbank_in_worker"]["bytes_per_clip"]["input"],
        "waveform": entry["fbank_on_device"]["bytes_per_clip"]["input"],
        "offline_targets": target,
        "offline_targets_aligned_fp32_before": tokens * TEACHER_DIM * 4,
        "store_bytes_per_clip": store_clip,
        "offline_targets_at_most_store_bytes": target <= store_clip,
    }


def workers_needed(formats: Dict[str, Any], gpu_clips_per_s: float = GPU_CLIPS_PER_S_ESTIMATE) -> Dict[str, Any]:
    """DataLoader workers (one core each) per 1000 clips/s, and for ``gpu_clips_per_s``."""
    out: Dict[str, Any] = {"gpu_clips_per_s_assumed": gpu_clips_per_s, "per_1000_clips_per_s": {},
                           "for_assumed_gpu": {}}
    for fmt, entry in formats.items():
        for mode in MODES:
            rate = entry[mode]["clips_per_s_per_worker"]
            out["per_1000_clips_per_s"].setdefault(fmt, {})[mode] = 1000.0 / rate
            out["for_assumed_gpu"].setdefault(fmt, {})[mode] = math.ceil(gpu_clips_per_s / rate)
    return out


def bench_pipeline(clips: int, passes: int, frames: int, norm: tuple, batch_size: int = 8) -> Dict[str, Any]:
    """Worker side (1 torch thread), device side (torch's threads), bytes and workers needed."""
    threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        torch.set_num_threads(1)
        try:
            formats = bench_worker_side(clips, passes, frames, norm, tmp, rng)
        finally:
            torch.set_num_threads(threads)
        device = bench_device_side(batch_size, passes, frames, norm, tmp)
    speedup = formats["44k1_stereo"]["on_device_speedup"]
    bytes_per_clip = loader_bytes(formats, frames)
    return {
        "formats": formats,
        "threads": 1,
        "target_length": frames,
        "device_side": device,
        "loader_bytes_per_clip": bytes_per_clip,
        "workers_needed": workers_needed(formats),
        "on_device_speedup_44k1_stereo": speedup,
        "target_on_device_speedup": TARGET_ON_DEVICE_SPEEDUP,
        "on_device_speedup_target_met": speedup >= TARGET_ON_DEVICE_SPEEDUP,
        "offline_targets_target_met": bytes_per_clip["offline_targets_at_most_store_bytes"],
    }


def pipeline_report(pipeline: Dict[str, Any], variants: Dict[str, Any]) -> Dict[str, Any]:
    """``pipeline`` plus the workers' clips/s over each variant's model clips/s per core, per format."""
    formats = pipeline["formats"]
    ratios = {}
    for name, v in variants.items():
        ratios[name] = {fmt: pf["clips_per_s_per_worker"] / v["clips_per_s_per_core"] for fmt, pf in formats.items()}
    min_ratio = min(r for per in ratios.values() for r in per.values())
    return {
        **pipeline,
        "ratio_to_model_per_core": ratios,
        "min_ratio": min_ratio,
        "target_ratio": TARGET_PIPELINE_RATIO,
        "target_met": min_ratio >= TARGET_PIPELINE_RATIO,
    }


def print_pipeline(pipe: Dict[str, Any]) -> None:
    log(f"data path, 10 s clips, {pipe['target_length']} frames; worker side with 1 torch thread:")
    log(f"  {'format':<12} {'fbank in worker':>22} {'fbank_on_device':>22} {'speed-up':>8}")
    for fmt, p in pipe["formats"].items():
        a, b = p["fbank_in_worker"], p["fbank_on_device"]
        log(f"  {fmt:<12} {a['ms_per_clip']:6.1f} ms {a['clips_per_s_per_worker']:6.1f} clips/s "
            f"{b['ms_per_clip']:6.1f} ms {b['clips_per_s_per_worker']:6.1f} clips/s {p['on_device_speedup']:7.2f}x")
    log(f"  44.1 kHz stereo speed-up {pipe['on_device_speedup_44k1_stereo']:.2f}x (target >= "
        f"{pipe['target_on_device_speedup']:.0f}x) -> {'met' if pipe['on_device_speedup_target_met'] else 'NOT met'}")
    d = pipe["device_side"]
    log(f"  device side ({d['device']}, {d['threads']} threads), batch {d['batch_size']}: resampling + fbank + "
        f"normalisation {d['resample_fbank_and_normalisation']['ms_per_batch']:.1f} ms, offline target alignment "
        f"{d['offline_target_alignment']['ms_per_batch']:.2f} ms")
    b = pipe["loader_bytes_per_clip"]
    log(f"  bytes per clip through the loader: fbank {b['fbank']}, waveform {b['waveform']}, offline targets "
        f"{b['offline_targets']} (store {b['store_bytes_per_clip']}; aligned fp32 before: "
        f"{b['offline_targets_aligned_fp32_before']}) -> {'met' if pipe['offline_targets_target_met'] else 'NOT met'}")
    w = pipe["workers_needed"]
    log(f"  workers per 1000 clips/s; for {w['gpu_clips_per_s_assumed']:.0f} clips/s (an estimate, not measured):")
    for fmt, per in w["per_1000_clips_per_s"].items():
        cells = (f"{mode} {n:5.1f} ({w['for_assumed_gpu'][fmt][mode]})" for mode, n in per.items())
        log(f"  {fmt:<12} " + "  ".join(cells))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=4, help="distinct 10 s files per format")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--target-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="clips per batch on the device side")
    p.add_argument("--norm-stats", default="audioset")
    p.add_argument("--out", default="outputs/bench/data_pipeline.json")
    args = p.parse_args(argv)
    start = time.perf_counter()
    report = bench_pipeline(args.clips, args.passes, args.target_length, resolve_norm_stats(args.norm_stats),
                            args.batch_size)
    report["wall_s"] = time.perf_counter() - start
    out = write_report(report, args.out)
    print_pipeline(report)
    log(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
