"""Mean and std of the unnormalised fbank over a manifest, for the task.norm_stats='MEAN,STD' override.

    python examples/prepare/norm_stats.py MANIFEST_TSV [--target-length 1024] [--max-clips N] [--seed 0]

Each clip is loaded and padded/cropped exactly like training (``load_audio`` +
``wav_to_fbank``), so the zero padding of short clips is part of the statistics.  Prints
``norm_mean=... norm_std=...`` with the ready ``task.norm_stats='MEAN,STD'`` override (training
normalises with ``(x - mean) / (2 * std)``), then the same numbers as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
from tqdm import tqdm

from mam_clap_plugin.data.audio import AudioError, load_audio, wav_to_fbank
from mam_clap_plugin.data.manifest import Manifest, ManifestError, read_manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", help="the .tsv manifest (usually the training split)")
    parser.add_argument("--target-length", type=int, default=1024,
                        help="fbank frames per clip (default 1024)")
    parser.add_argument("--max-clips", type=int, help="use a random subset of this many clips")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset (default 0)")
    args = parser.parse_args(argv)
    if args.target_length < 1:
        parser.error("--target-length must be >= 1")
    if args.max_clips is not None and args.max_clips < 1:
        parser.error("--max-clips must be >= 1")
    return args


def choose_clips(num_entries: int, max_clips: int | None, seed: int) -> np.ndarray:
    """All entry indices, or a sorted random subset of ``max_clips`` of them."""
    if max_clips is None or max_clips >= num_entries:
        return np.arange(num_entries)
    return np.sort(np.random.default_rng(seed).choice(num_entries, size=max_clips, replace=False))


def fbank_stats(manifest: Manifest, indices: np.ndarray, target_length: int) -> tuple[float, float]:
    """(mean, std) over every value of the (target_length, 128) fbanks of these entries."""
    total = total_sq = 0.0
    count = 0
    for i in tqdm(indices.tolist(), desc="fbank stats", unit="clip"):
        wav = load_audio(manifest.full_path(i), max_frames=target_length, where=manifest.where(i))
        fbank = wav_to_fbank(wav, target_length).double()
        total += fbank.sum().item()
        total_sq += fbank.square().sum().item()
        count += fbank.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        manifest = read_manifest(args.manifest)
        indices = choose_clips(len(manifest), args.max_clips, args.seed)
        mean, std = fbank_stats(manifest, indices, args.target_length)
    except (AudioError, ManifestError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"norm_mean={mean:.7g} norm_std={std:.7g}  (training: task.norm_stats='{mean:.7g},{std:.7g}')")
    print(json.dumps({"norm_mean": mean, "norm_std": std, "num_clips": len(indices),
                      "target_length": args.target_length, "manifest": args.manifest}))


if __name__ == "__main__":
    main()
