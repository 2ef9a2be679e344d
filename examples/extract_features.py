#!/usr/bin/env python
"""Encoder features for every audio file of a folder or a manifest.

    python examples/extract_features.py AUDIO_DIR_OR_MANIFEST --checkpoint CKPT --out OUT
        [--level clip|frame|patch] [--layer final|N|all] [--format npy|memmap]
        [--batch-size 8] [--device cpu|cuda] [--skip-bad-files]

Input: a folder (searched recursively for wav, flac, ogg, mp3, aiff, au, opus files, sorted)
or a fairseq manifest ``{split}.tsv`` (root line, then ``relpath<TAB>num_samples``). CKPT:
anything ``mam_clap_plugin.load_encoder`` reads (an encoder export, a converted AudioMAE
file, a pretraining or fine-tuning checkpoint, or a Hugging Face folder written by
``examples/export_encoder.py CKPT OUT --hub``). Any clip length works: the clip's fbank is
encoded by windows of the encoder's ``max_frames`` (1024 frames = 10.24 s) exactly as in the
s3prl upstream (``mam_clap_plugin.features``); one time step is 160 ms (16 frames).

Per file (T = ``len(range(0, S, 2560))`` time steps for S samples at 16 kHz, F = 8 frequency
patches, D = width, L = depth + 1 layers):

    --level clip   (D,)        mean over time and frequency
    --level frame  (T, D)      one vector per 160 ms step (mean over the 8 frequency patches)
    --level patch  (T, F, D)   the full time x frequency grid
    --layer final  the encoder's output (after its final norm; the default);
            N      hidden state N: 0 = patch embedding (with positions), N = block N (1..depth);
            all    the L hidden states stacked first: (L, ...)

Output (``--format``):

    npy     OUT/<relpath>.npy per file (float32), e.g. OUT/dog/bark.wav.npy
    memmap  OUT/features.npy: one float32 array, the files' rows concatenated along the time
            axis (clip level: one row per file): (rows, ...) or, for --layer all, (L, rows, ...);
            open it with ``numpy.load(path, mmap_mode="r")``. OUT/index.tsv: ``path<TAB>offset
            <TAB>rows`` per file; OUT/status.npy: uint8 per file (0 pending, 1 done, 2 bad).

OUT/features.json records the settings (and the checkpoint's sha256) and, at the end, the
counts. Run the same command again to resume: finished files are kept and skipped (a
different setting is refused). A bad file (missing, unreadable, empty, non-finite) stops the
run with an error naming it, unless ``--skip-bad-files``, which lists each one
(OUT/bad_files.tsv) and carries on; bad files are retried on the next run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import soundfile
import torch
from tqdm import tqdm

from mam_clap_plugin import features
from mam_clap_plugin.checkpoint import CheckpointError, checkpoint_sha256, load_encoder_with_stats
from mam_clap_plugin.data.audio import SAMPLE_RATE, AudioError, load_audio, resampled_length
from mam_clap_plugin.data.manifest import ManifestError, find_audio, read_manifest
from mam_clap_plugin.features import LEVELS, check_window, clip_fbank, encode_windows, num_steps

AUDIO_EXTENSIONS = {"wav", "flac", "ogg", "mp3", "aiff", "aif", "au", "opus"}
#: Settings that must match when a run resumes into an existing OUT.
RESUME_KEYS = ("source", "checkpoint_sha256", "level", "layer", "format", "window_frames", "files")
PENDING, DONE, BAD = 0, 1, 2


class UsageError(Exception):
    """A bad argument or an OUT that cannot be resumed; the message says which."""


def list_inputs(source: str) -> tuple[str, List[str]]:
    """(root, sorted relative paths) of a folder or a manifest."""
    if os.path.isdir(source):
        rels = find_audio(source, AUDIO_EXTENSIONS)
        if not rels:
            raise UsageError(f"{source}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) in this folder")
        return source, rels
    if os.path.isfile(source):
        try:
            manifest = read_manifest(source)
        except ManifestError as err:
            raise UsageError(str(err)) from None
        return manifest.root, manifest.paths
    raise UsageError(f"{source}: neither a folder nor a manifest file")


def parse_layer(value: str, depth: int):
    try:
        return features.parse_layer(value, depth)
    except ValueError as err:
        raise UsageError(f"--{err}") from None


def samples_at_16k(path: str) -> int:
    """Samples at 16 kHz of an audio file, from its header (as torchaudio's resampler gives them)."""
    info = soundfile.info(path)
    return resampled_length(info.frames, info.samplerate, SAMPLE_RATE)


class NpyWriter:
    """OUT/<relpath>.npy per file, written atomically; a file is done when its .npy exists."""

    def __init__(self, out: str, rels: List[str]):
        self.paths = [os.path.join(out, rel + ".npy") for rel in rels]

    def is_done(self, i: int) -> bool:
        return os.path.isfile(self.paths[i])

    def mark_bad(self, i: int) -> None:
        pass

    def write(self, i: int, array: np.ndarray) -> None:
        os.makedirs(os.path.dirname(self.paths[i]), exist_ok=True)
        tmp = self.paths[i][:-len(".npy")] + ".tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, self.paths[i])


class MemmapWriter:
    """OUT/features.npy + index.tsv + status.npy (see the module docstring)."""

    def __init__(self, out: str, rels: List[str], rows: List[int], row_shape: tuple, num_layers: Optional[int]):
        self.rels, self.rows = rels, rows
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.all_layers = num_layers is not None
        total = int(self.offsets[-1])
        shape = ((num_layers, total) if self.all_layers else (total,)) + tuple(row_shape)
        index, feats, status = (os.path.join(out, n) for n in ("index.tsv", "features.npy", "status.npy"))
        if os.path.isfile(index):
            with open(index) as f:
                lines = f.read().splitlines()[1:]
            planned = [f"{rel}\t{int(o)}\t{r}" for rel, o, r in zip(rels, self.offsets, rows)]
            if lines != planned:
                raise UsageError(f"{index}: lists other files or lengths than this run; use another --out")
            self.features = np.load(feats, mmap_mode="r+")
            self.status = np.load(status, mmap_mode="r+")
            if self.features.shape != shape:
                raise UsageError(f"{feats}: shape {self.features.shape}, this run needs {shape}; use another --out")
            return
        self.features = np.lib.format.open_memmap(feats, mode="w+", dtype=np.float32, shape=shape)
        self.status = np.lib.format.open_memmap(status, mode="w+", dtype=np.uint8, shape=(len(rels),))
        with open(f"{index}.tmp", "w") as f:
            f.write("path\toffset\trows\n")
            f.writelines(f"{rel}\t{int(o)}\t{r}\n" for rel, o, r in zip(rels, self.offsets, rows))
        os.replace(f"{index}.tmp", index)

    def is_done(self, i: int) -> bool:
        return self.status[i] == DONE

    def mark_bad(self, i: int) -> None:
        self.status[i] = BAD
        self.status.flush()

    def write(self, i: int, array: np.ndarray) -> None:
        rows_axis = 1 if self.all_layers else 0
        if array.ndim == self.features.ndim - 1:  # clip level: one row
            array = np.expand_dims(array, rows_axis)
        if array.shape[rows_axis] != self.rows[i]:
            raise AudioError(f"{self.rels[i]}: {array.shape[rows_axis]} time steps, but its header promised "
                             f"{self.rows[i]}; use --format npy for this set")
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.all_layers:
            self.features[:, start:stop] = array
        else:
            self.features[start:stop] = array
        self.features.flush()
        self.status[i] = DONE
        self.status.flush()


def plan_rows(root: str, rels: List[str], level: str, skip_bad: bool, bad: Dict[int, str]) -> List[int]:
    """Rows per file of the memmap (from the headers; 0 for a bad file when skipping)."""
    if level == "clip":
        return [1] * len(rels)
    rows = []
    for i, rel in enumerate(tqdm(rels, desc="reading headers", unit="file", leave=False)):
        path = os.path.join(root, rel)
        try:
            samples = samples_at_16k(path)
            if samples <= 0:
                raise AudioError(f"{path}: audio is empty (0 samples)")
        except (soundfile.SoundFileError, RuntimeError, AudioError) as err:
            message = str(err) if isinstance(err, AudioError) else f"{path}: cannot read audio ({err})"
            if not skip_bad:
                raise AudioError(message) from None
            bad[i] = message
            rows.append(0)
            continue
        rows.append(num_steps(samples))
    return rows


def _check_resume(settings_path: str, settings: dict) -> None:
    if not os.path.isfile(settings_path):
        return
    with open(settings_path) as f:
        old = json.load(f)
    diff = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in RESUME_KEYS if old.get(k) != settings[k]]
    if diff:
        raise UsageError(f"{settings_path}: OUT holds features made with other settings ({'; '.join(diff)}); "
                         "use another --out")


def _write_json(path: str, data: dict) -> None:
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(f"{path}.tmp", path)


def extract(args) -> dict:
    root, rels = list_inputs(args.input)
    try:
        bundle = load_encoder_with_stats(args.checkpoint, trusted=args.trusted)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    encoder = bundle.encoder.to(args.device)
    depth = len(encoder.blocks)
    layer = parse_layer(args.layer, depth)
    try:
        window = check_window(encoder, args.window_frames)
    except ValueError as err:
        raise UsageError(f"--window-frames: {err}") from None
    os.makedirs(args.out, exist_ok=True)
    settings = {
        "source": os.path.abspath(args.input), "root": os.path.abspath(root), "files": len(rels),
        "checkpoint": os.path.abspath(args.checkpoint), "checkpoint_sha256": checkpoint_sha256(args.checkpoint),
        "level": args.level, "layer": layer, "format": args.format, "window_frames": window,
        "width": encoder.embed_dim, "grid_freq": encoder.grid_freq, "num_layers": depth + 1,
        "norm_stats": [bundle.norm_mean, bundle.norm_std], "step_seconds": 0.16, "dtype": "float32",
    }
    settings_path = os.path.join(args.out, "features.json")
    _check_resume(settings_path, settings)
    _write_json(settings_path, settings)

    bad: Dict[int, str] = {}
    if args.format == "memmap":
        row_shape = {"clip": (encoder.embed_dim,), "frame": (encoder.embed_dim,),
                     "patch": (encoder.grid_freq, encoder.embed_dim)}[args.level]
        rows = plan_rows(root, rels, args.level, args.skip_bad_files, bad)
        writer = MemmapWriter(args.out, rels, rows, row_shape, depth + 1 if layer == "all" else None)
    else:
        writer = NpyWriter(args.out, rels)
    for i in bad:
        writer.mark_bad(i)
    todo = [i for i in range(len(rels)) if i not in bad and not writer.is_done(i)]
    kept = len(rels) - len(todo) - len(bad)
    bar = tqdm(total=len(rels), initial=kept + len(bad), unit="file", desc="features", dynamic_ncols=True)
    for msg in bad.values():
        tqdm.write(f"skipping bad file: {msg}", file=sys.stderr)
    written = 0

    def skip_or_raise(i: int, err: AudioError) -> None:
        """A bad file: re-raise (stop) unless --skip-bad-files, else record and name it."""
        if not args.skip_bad_files:
            raise err
        bad[i] = str(err)
        writer.mark_bad(i)
        tqdm.write(f"skipping bad file: {err}", file=sys.stderr)
        bar.update(1)

    try:
        for start in range(0, len(todo), args.batch_size):
            batch, fbanks = [], []
            for i in todo[start:start + args.batch_size]:
                path = os.path.join(root, rels[i])
                try:
                    wav = load_audio(path)
                except AudioError as err:
                    skip_or_raise(i, err)
                    continue
                batch.append(i)
                fbanks.append(clip_fbank(wav, bundle.norm_mean, bundle.norm_std).to(args.device))
            if not batch:
                continue
            with torch.inference_mode():
                outputs = encode_windows(encoder, fbanks, window, args.max_windows_per_batch)
            for i, out in zip(batch, outputs):
                try:
                    writer.write(i, features.pool_outputs(out, args.level, layer).cpu().numpy())
                except AudioError as err:
                    skip_or_raise(i, err)
                    continue
                written += 1
                bar.update(1)
            bar.set_postfix(bad=len(bad))
    finally:
        bar.close()
        with open(os.path.join(args.out, "bad_files.tsv"), "w") as f:
            f.writelines(f"{rels[i]}\t{msg}\n" for i, msg in sorted(bad.items()))
    summary = {**settings, "done": len(rels) - len(bad), "written_this_run": written,
               "kept_from_earlier_runs": kept, "bad": len(bad), "bad_files": [rels[i] for i in sorted(bad)]}
    _write_json(settings_path, summary)
    return summary


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("input", metavar="AUDIO_DIR_OR_MANIFEST", help="folder of audio files or a fairseq manifest (.tsv)")
    p.add_argument("--checkpoint", required=True,
                   help="encoder export, converted AudioMAE file, checkpoint or Hugging Face folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--level", choices=LEVELS, default="clip", help="clip, frame (160 ms) or patch (default clip)")
    p.add_argument("--layer", default="final", help="final (default), a hidden state 0..depth, or all")
    p.add_argument("--format", choices=("npy", "memmap"), default="npy",
                   help="npy: one file per clip; memmap: one array + index.tsv (default npy)")
    p.add_argument("--batch-size", type=int, default=8, help="files per encoder call (default 8)")
    p.add_argument("--max-windows-per-batch", type=int, default=None,
                   help="cap on 10.24 s windows per encoder call (memory; default no cap)")
    p.add_argument("--window-frames", type=int, default=None,
                   help="fbank frames per window (multiple of 16; default the encoder's max_frames, 1024 = 10.24 s)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="list and skip unreadable, empty or non-finite files instead of stopping")
    p.add_argument("--trusted", action="store_true", help="load the checkpoint with weights_only=False")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        summary = extract(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except AudioError as err:
        print(f"error: bad file: {err}\n(pass --skip-bad-files to skip such files; the features written so far are "
              f"kept in {args.out}: run the same command again to resume)", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("files", "done", "written_this_run", "kept_from_earlier_runs", "bad",
                                              "bad_files")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
