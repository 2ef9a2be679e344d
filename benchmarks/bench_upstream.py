#!/usr/bin/env python
"""CPU throughput of the s3prl upstream (``upstream/expert.py``): seconds of audio per second.

    .venv/bin/python -m benchmarks.bench_upstream --out outputs/bench/upstream.json
    .venv/bin/python -m benchmarks.bench_upstream --quick --out /tmp/u.json   # tiny config, for tests

(from the repository root, where ``upstream`` and this checkout's ``mam_clap_plugin`` import).

The encoder is the ViT-B config (768 dims, 12 layers, 12 heads, max_frames 1024) with
random weights, saved as an encoder export and loaded through ``UpstreamExpert``, so the
timing covers the whole forward: per-clip fbank, normalisation, windowing, the encoder
(``extract_features``, all layers kept) and the frequency pooling of every hidden state.
Cases: 1 s clips at batch 32 and 10 s clips at batch 8, under ``torch.no_grad()`` in eval
mode; each case runs ``--warmup`` untimed forwards, then ``--repeats`` timed ones, and
reports the median. ``--quick`` uses a 2-layer, 32-dim encoder and batches of 4/2.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

from benchmarks.machine import machine_info
from benchmarks.measure import log, median, write_report
from mam_clap_plugin.checkpoint import save_encoder
from mam_clap_plugin.data.audio import NORM_STATS
from mam_clap_plugin.modules.encoder import AudioEncoder
from upstream.expert import UpstreamExpert

SAMPLE_RATE = 16000
CONFIGS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, max_frames=1024, num_mel_bins=128),
    "quick": dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0, max_frames=1024, num_mel_bins=128),
}
CASES = {  # name -> (clip seconds, batch size); --quick uses QUICK_CASES
    "1s_b32": (1.0, 32),
    "10s_b8": (10.0, 8),
}
QUICK_CASES = {"1s_b4": (1.0, 4), "10s_b2": (10.0, 2)}


def build_upstream(config: Dict[str, Any], workdir: str, seed: int = 0) -> UpstreamExpert:
    """A randomly initialised encoder, written as an encoder export and loaded as the upstream."""
    torch.manual_seed(seed)
    encoder = AudioEncoder(**config)
    path = os.path.join(workdir, "encoder.pt")
    mean, std = NORM_STATS["audioset"]
    save_encoder(path, encoder, config, mean, std, "audioset", config["max_frames"], "random init (benchmark)")
    return UpstreamExpert(path).eval()


def time_case(upstream: UpstreamExpert, seconds: float, batch: int, warmup: int, repeats: int,
              seed: int = 0) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    wavs = [0.1 * torch.randn(int(seconds * SAMPLE_RATE), generator=g) for _ in range(batch)]
    times: List[float] = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            out = upstream(wavs)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
    per_forward = median(times)
    audio_s = seconds * batch
    return {
        "clip_seconds": seconds,
        "batch_size": batch,
        "output_shape": list(out["hidden_states"][-1].shape),
        "num_hidden_states": len(out["hidden_states"]),
        "forward_s_median": per_forward,
        "forward_s_all": times,
        "audio_seconds_per_second": audio_s / per_forward,
        "clips_per_second": batch / per_forward,
    }


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny encoder and small batches (smoke test)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config_name = "quick" if args.quick else "vit_b"
    cases = QUICK_CASES if args.quick else CASES
    machine = machine_info()
    log(f"torch {torch.__version__}, {machine['torch_threads']} threads, {machine['cpu_model']}, "
        f"load {machine['loadavg_at_start'][0]:.2f}")
    t_start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        upstream = build_upstream(CONFIGS[config_name], workdir)
        for name, (seconds, batch) in cases.items():
            results[name] = time_case(upstream, seconds, batch, args.warmup, args.repeats)
            r = results[name]
            log(f"{name:8s} {seconds:5.1f} s x {batch:3d}: {r['forward_s_median']:8.3f} s/forward, "
                f"{r['audio_seconds_per_second']:8.1f} audio s/s, {r['clips_per_second']:7.2f} clips/s")
    report = {
        "config": {"name": config_name, **CONFIGS[config_name], "freq_pool": "mean",
                   "warmup": args.warmup, "repeats": args.repeats, "grad": False},
        "cases": results,
        "machine": {**machine, "loadavg_at_end": list(os.getloadavg())},
        "wall_s": time.perf_counter() - t_start,
        "note": "CPU throughput; the machine may be shared, so figures are lower bounds of the hardware's rate",
    }
    if args.out:
        log(f"wrote {write_report(report, args.out)}")
    return report


if __name__ == "__main__":
    main()
