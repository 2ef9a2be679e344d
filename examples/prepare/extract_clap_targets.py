#!/usr/bin/env python
"""Extract CLAP teacher targets for one manifest split into a target store.

    extract_clap_targets.py MANIFEST_DIR SPLIT --checkpoint CKPT --out OUT_DIR
        [--layer final|stage3] [--projection] [--batch-size N] [--num-workers W]
        [--shard-id K --num-shards N] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
        [--skip-bad-files] [--trusted]

Reads ``MANIFEST_DIR/SPLIT.tsv`` and writes ``OUT_DIR/SPLIT.tgt`` (format: see
``mam_clap_plugin/data/target_store.py``): the teacher's own token map per clip, fp16,
in manifest order, with a header holding the teacher, the checkpoint's sha256, the layer,
the grid, the band edges and the sample rate. Each clip's input is its first
``teacher.seconds`` (10 s for LAION-CLAP) at the teacher's rate, zero-padded at the end.
The checkpoint may be of any format the teacher registry reads
(``mam_clap_plugin.teacher.load_teacher``): LAION-CLAP, MS-CLAP 2023, or a caption teacher
trained with ``examples/teacher``.

* Precision: ``--dtype bf16`` (or ``fp16``) runs the teacher's transformer under autocast;
  the STFT, power spectrum and log-mel stay float32 either way. bf16 maps match fp32 ones
  to a per-token cosine of at least 0.999 (tested on random weights). The default is fp32.
* Resumes: clips already written are skipped, so rerunning the same command after an
  interruption continues where it stopped (at most one batch is redone).
* Shards: ``--num-shards N --shard-id K`` processes the K-th of N contiguous slices of
  the manifest; N processes (one per GPU, say) fill the same file at once. They must
  share one file system that supports shared memory maps (a local disk, Lustre, ...).
* Refuses to mix teachers: an existing store, or another split's store in OUT_DIR, made
  with another checkpoint, layer or projection is an error.
* Bad audio stops the run with the file and manifest line named; with
  ``--skip-bad-files`` the clip is marked unusable instead, and training skips it
  (``task.skip_bad_files=true``) or refuses it.

Prints one JSON line at the end: ``{"store", "split", "shard", "written", "bad",
"pending_in_store", "seconds", "clips_per_second"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mam_clap_plugin.data.audio import AudioError, TeacherInputs
from mam_clap_plugin.data.manifest import read_manifest
from mam_clap_plugin.data.target_store import (
    PENDING,
    TargetStoreError,
    TargetStoreHeader,
    check_one_teacher,
    open_target_store_for_writing,
)
from mam_clap_plugin.files import file_sha256
from mam_clap_plugin.teacher import load_teacher

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("manifest_dir", help="directory holding SPLIT.tsv")
    p.add_argument("split", help="manifest split name, e.g. train")
    p.add_argument("--checkpoint", required=True,
                   help="teacher checkpoint: LAION-CLAP .pt, MS-CLAP 2023, or a caption teacher (examples/teacher); "
                        "mam_clap_plugin.teacher.registry lists the formats")
    p.add_argument("--out", required=True, help="output directory (gets SPLIT.tgt)")
    p.add_argument("--layer", choices=("final", "stage3"), default="final",
                   help="final: 2x32xC map after the last norm; stage3: 4x64xC/2 map")
    p.add_argument("--projection", action="store_true", help="apply audio_projection per token (final only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2, help="audio-loading worker processes")
    p.add_argument("--shard-id", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device of the teacher (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(AUTOCAST), default="fp32",
                   help="teacher transformer precision (bf16/fp16: autocast; the front end stays fp32)")
    p.add_argument("--trusted", action="store_true",
                   help="allow a full unpickle of a checkpoint that holds more than tensors and numpy scalars")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="mark unreadable clips unusable instead of stopping")
    args = p.parse_args(argv)
    if args.num_shards < 1 or not 0 <= args.shard_id < args.num_shards:
        p.error(f"need 0 <= --shard-id < --num-shards, got {args.shard_id} and {args.num_shards}")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    manifest = read_manifest(os.path.join(args.manifest_dir, f"{args.split}.tsv"))
    teacher = load_teacher(args.checkpoint, layer=args.layer, projection=args.projection,
                           trusted=args.trusted).to(args.device)
    teacher.autocast_dtype = AUTOCAST[args.dtype]
    header = TargetStoreHeader.for_teacher(teacher, file_sha256(args.checkpoint), len(manifest),
                                           checkpoint=os.path.basename(args.checkpoint))
    os.makedirs(args.out, exist_ok=True)
    check_one_teacher(args.out, header, skip=f"{args.split}.tgt")
    path = os.path.join(args.out, f"{args.split}.tgt")
    start = time.perf_counter()
    written = bad = 0
    with open_target_store_for_writing(path, header) as writer:
        shard = np.array_split(np.arange(len(manifest)), args.num_shards)[args.shard_id]
        todo = shard[writer.states[shard] == PENDING]
        loader = DataLoader(
            TeacherInputs(manifest, todo, teacher.sample_rate, teacher.num_samples),
            batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=list,
        )
        bar = tqdm(total=len(shard), initial=len(shard) - len(todo), unit="clip", dynamic_ncols=True,
                   desc=f"{args.split} shard {args.shard_id}/{args.num_shards}")
        with bar:
            for items in loader:
                errors = [err for _, _, err in items if err is not None]
                if errors and not args.skip_bad_files:
                    raise AudioError(f"{errors[0]} (rerun with --skip-bad-files to mark such clips unusable)")
                good = [(i, w) for i, w, _ in items if w is not None]
                if good:
                    wavs = torch.stack([w for _, w in good]).to(args.device)
                    maps = teacher(wavs).cpu().numpy()
                    for (index, _), clip in zip(good, maps):
                        writer.write(index, clip)
                for index, _, err in items:
                    if err is not None:
                        tqdm.write(f"marking unusable: {err}")
                        writer.mark_bad(index)
                        bad += 1
                writer.flush()
                written += len(good)
                bar.update(len(items))
        pending = int((writer.states == PENDING).sum())
    seconds = time.perf_counter() - start
    result = {
        "store": path, "split": args.split, "shard": f"{args.shard_id}/{args.num_shards}",
        "written": written, "bad": bad, "pending_in_store": pending, "seconds": round(seconds, 2),
        "clips_per_second": round((written + bad) / seconds, 2) if seconds > 0 else None,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    try:
        main()
    except (TargetStoreError, AudioError, OSError, ValueError) as err:  # OSError: a missing file, a full disk
        sys.exit(f"error: {err}")
