"""The data pipeline (``load_audio`` + ``wav_to_fbank`` + ``normalize_fbank``) in clips/s for
one worker (1 torch thread) on 10 s clips at 44.1 kHz stereo, 48 kHz stereo and 16 kHz mono,
and its ratio to the model's clips/s per core."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Dict

import numpy as np
import torch

from benchmarks.measure import log, median
from mam_clap_plugin.data.audio import load_audio, normalize_fbank, wav_to_fbank, write_wav

TARGET_PIPELINE_RATIO = 10.0
CLIP_SECONDS = 10.0
PIPELINE_FORMATS = {  # name -> (sample rate, channels)
    "44k1_stereo": (44100, 2),
    "48k_stereo": (48000, 2),
    "16k_mono": (16000, 1),
}


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
                    write_wav(path, data.astype(np.float32), rate)
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


def pipeline_report(formats: Dict[str, Any], variants: Dict[str, Any]) -> Dict[str, Any]:
    """The pipeline's clips/s per worker over each variant's model clips/s per core, per format."""
    ratios = {}
    for name, v in variants.items():
        ratios[name] = {fmt: pf["clips_per_s_per_worker"] / v["clips_per_s_per_core"] for fmt, pf in formats.items()}
    min_ratio = min(r for per in ratios.values() for r in per.values())
    return {
        "formats": formats,
        "threads": 1,
        "ratio_to_model_per_core": ratios,
        "min_ratio": min_ratio,
        "target_ratio": TARGET_PIPELINE_RATIO,
        "target_met": min_ratio >= TARGET_PIPELINE_RATIO,
    }
