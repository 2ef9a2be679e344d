"""Write fairseq wav2vec manifests ({train,valid}.tsv) for every audio file under ROOT.

    python examples/prepare/manifest.py ROOT --dest DIR [--ext wav,flac] [--valid-percent 0.01]
        [--seed 42] [--train-name train --valid-name valid]

Files are listed recursively in sorted (deterministic) order; sizes are sample counts from
``soundfile.info``.  Unreadable or empty files are reported and skipped.  The validation
split is ``round(n * valid_percent)`` files (at least one when valid_percent > 0) drawn with
``--seed``; both files keep the sorted order.  With ``--valid-percent 0`` no valid file is written.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import soundfile
from tqdm import tqdm

from mam_clap_plugin.data.manifest import find_audio, write_manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="directory searched recursively for audio files")
    parser.add_argument("--dest", required=True, help="output directory for the .tsv files")
    parser.add_argument("--ext", default="wav,flac", help="comma-separated extensions (default wav,flac)")
    parser.add_argument("--valid-percent", type=float, default=0.01,
                        help="fraction of files in the valid split, 0 <= p < 1 (default 0.01)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/valid split")
    parser.add_argument("--train-name", default="train", help="train split name (default train)")
    parser.add_argument("--valid-name", default="valid", help="valid split name (default valid)")
    args = parser.parse_args(argv)
    if not 0 <= args.valid_percent < 1:
        parser.error(f"--valid-percent must be in [0, 1), got {args.valid_percent}")
    return args


def read_sizes(root: str, relpaths: list[str]) -> tuple[list[str], list[int]]:
    """Sample counts of readable, non-empty files; others are reported and dropped."""
    kept, sizes, skipped = [], [], 0
    for rel in tqdm(relpaths, desc="reading headers", unit="file"):
        try:
            frames = soundfile.info(os.path.join(root, rel)).frames
        except (soundfile.SoundFileError, RuntimeError) as err:
            tqdm.write(f"skipping unreadable file {rel}: {err}", file=sys.stderr)
            skipped += 1
            continue
        if frames <= 0:
            tqdm.write(f"skipping empty file {rel} (0 samples)", file=sys.stderr)
            skipped += 1
            continue
        kept.append(rel)
        sizes.append(frames)
    if skipped:
        print(f"skipped {skipped} unreadable or empty file(s)", file=sys.stderr)
    return kept, sizes


def pick_valid(num_files: int, valid_percent: float, seed: int) -> set[int]:
    """Indices of the validation files: round(n * p), at least 1 when p > 0."""
    if valid_percent == 0:
        return set()
    count = max(1, round(num_files * valid_percent))
    if count >= num_files:
        raise SystemExit(f"error: --valid-percent {valid_percent} leaves no training files "
                         f"out of {num_files}")
    return set(random.Random(seed).sample(range(num_files), count))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = os.path.realpath(args.root)
    if not os.path.isdir(root):
        raise SystemExit(f"error: {args.root} is not a directory")
    extensions = {e.strip().lower().lstrip(".") for e in args.ext.split(",") if e.strip()}
    relpaths, sizes = read_sizes(root, find_audio(root, extensions))
    if not relpaths:
        raise SystemExit(f"error: no readable .{'/.'.join(sorted(extensions))} files under {root}")
    valid = pick_valid(len(relpaths), args.valid_percent, args.seed)
    os.makedirs(args.dest, exist_ok=True)
    splits = [(args.train_name, [i for i in range(len(relpaths)) if i not in valid])]
    if valid:
        splits.append((args.valid_name, sorted(valid)))
    for name, indices in splits:
        path = os.path.join(args.dest, f"{name}.tsv")
        write_manifest(path, root, [relpaths[i] for i in indices], [sizes[i] for i in indices])
        print(f"wrote {path}: {len(indices)} files")


if __name__ == "__main__":
    main()
