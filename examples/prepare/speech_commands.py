#!/usr/bin/env python
"""Speech Commands -> fine-tuning manifests and labels (SPC-1: SUPERB's 12 classes; SPC-2: 35 words).

    python examples/prepare/speech_commands.py ROOT OUT --version 2
    python examples/prepare/speech_commands.py ROOT OUT --version 1 [--test-root TEST_ROOT]

ROOT is an extracted Speech Commands archive (v0.02 for ``--version 2``, v0.01 for
``--version 1``): one folder per word, ``_background_noise_/``, and the official
``validation_list.txt`` and ``testing_list.txt``. Writes, in OUT, ``train.tsv``,
``valid.tsv``, ``test.tsv`` (fairseq manifests rooted at the directory that holds ROOT and OUT), ``{split}.lbl`` and
``classes.txt``:

* ``--version 2`` (SPC-2, 35 classes): every word folder is a class; a file listed in
  ``validation_list.txt`` is ``valid``, one in ``testing_list.txt`` is ``test``, the rest ``train``.
* ``--version 1`` (SPC-1, SUPERB's keyword spotting): the 10 keywords ``yes no up down left
  right on off stop go``, ``_unknown_`` (every other word) and ``_silence_``; train and valid
  by the official lists as above; ``_silence_`` clips are the 1 s pieces of the background
  noise recordings (written to ``OUT/_silence_/``; every 10th piece goes to valid).
  The test split is SUPERB's test archive (``speech_commands_test_set_v0.01``, 12 class folders)
  when ``--test-root`` is given, else the files of ``testing_list.txt``.

Incomplete data is refused, naming what is missing, unless ``--allow-partial`` (then a
warning): for ``--version 2`` an archive without all 35 word folders of v0.02; for
``--version 1`` a test split without ``--test-root`` (``testing_list.txt`` has no
``_silence_`` clips, so the test split would lack that class).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Dict, List, Tuple

import soundfile as sf
from tqdm import tqdm

from mam_clap_plugin.data.manifest import write_class_list, write_labels, write_manifest
from mam_clap_plugin.data.speech_commands import CLASSES as SPC1_CLASSES
from mam_clap_plugin.data.speech_commands import KEYWORDS, SPC2_WORDS

NOISE = "_background_noise_"
SAMPLE_RATE = 16000


def _read_list(root: str, name: str) -> set:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: official split list not found (is {root} an extracted Speech Commands archive?)")
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


def _words(root: str) -> List[str]:
    words = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d != NOISE
                   and not d.startswith("."))
    if not words:
        raise FileNotFoundError(f"{root}: no word folders")
    return words


def _num_samples(path: str) -> int:
    return sf.info(path).frames


def _silence_pieces(root: str, out: str) -> List[str]:
    """1 s pieces of every background-noise recording, written to OUT/_silence_/; their paths."""
    noise_dir = os.path.join(root, NOISE)
    if not os.path.isdir(noise_dir):
        raise FileNotFoundError(f"{noise_dir}: background noise folder not found (needed for _silence_)")
    dest = os.path.join(out, "_silence_")
    os.makedirs(dest, exist_ok=True)
    pieces = []
    for name in sorted(n for n in os.listdir(noise_dir) if n.endswith(".wav")):
        wav, rate = sf.read(os.path.join(noise_dir, name), dtype="float32")
        for k in range(len(wav) // rate):
            path = os.path.join(dest, f"{name[:-4]}_{k:04d}.wav")
            sf.write(path, wav[k * rate:(k + 1) * rate], rate)
            pieces.append(path)
    return pieces


class PartialDataError(ValueError):
    """The archive lacks part of the data set (refused unless ``--allow-partial``)."""


def _partial(message: str, allow_partial: bool) -> None:
    if not allow_partial:
        raise PartialDataError(f"{message}; pass --allow-partial to write the incomplete set anyway")
    print(f"warning: {message}", file=sys.stderr)


def convert(root: str, out: str, version: int, test_root: str | None = None, allow_partial: bool = False) -> Dict:
    root, out = os.path.abspath(root), os.path.abspath(out)
    valid_list, test_list = _read_list(root, "validation_list.txt"), _read_list(root, "testing_list.txt")
    words = _words(root)
    if version == 2:
        classes = words
        missing = [w for w in SPC2_WORDS if w not in words]
        if missing:
            _partial(f"{root}: {len(words)} word folders; Speech Commands v0.02 has 35, and {len(missing)} of them "
                     f"are missing: {', '.join(missing)}", allow_partial)
    else:
        missing = [k for k in KEYWORDS if k not in words]
        if missing:
            raise FileNotFoundError(f"{root}: keyword folders {missing} missing (SPC-1 needs Speech Commands v0.01)")
        classes = list(SPC1_CLASSES)
        if not test_root:
            _partial("--version 1 without --test-root: the test split would be testing_list.txt's files, which have "
                     "no _silence_ clips (SUPERB tests on speech_commands_test_set_v0.01: give it as --test-root)",
                     allow_partial)
    os.makedirs(out, exist_ok=True)
    class_id = {c: i for i, c in enumerate(classes)}

    def label(word: str) -> int:
        return class_id[word] if version == 2 or word in KEYWORDS else class_id["_unknown_"]

    splits: Dict[str, List[Tuple[str, int]]] = {"train": [], "valid": [], "test": []}
    for word in words:
        for name in sorted(os.listdir(os.path.join(root, word))):
            if not name.endswith(".wav"):
                continue
            rel = f"{word}/{name}"
            split = "valid" if rel in valid_list else "test" if rel in test_list else "train"
            if split == "test" and version == 1 and test_root:
                continue  # SPC-1 tests on SUPERB's own test archive
            splits[split].append((os.path.join(root, rel), label(word)))
    if version == 1:
        for k, path in enumerate(_silence_pieces(root, out)):
            splits["valid" if k % 10 == 0 else "train"].append((path, class_id["_silence_"]))
        if test_root:
            test_root = os.path.abspath(test_root)
            for c in SPC1_CLASSES:
                folder = os.path.join(test_root, c)
                if not os.path.isdir(folder):
                    raise FileNotFoundError(f"{folder}: SUPERB test archive folder missing")
                splits["test"] += [(os.path.join(folder, n), class_id[c]) for n in sorted(os.listdir(folder))
                                   if n.endswith(".wav")]
    write_class_list(os.path.join(out, "classes.txt"), classes)
    base = os.path.commonpath([root, out] + ([test_root] if test_root else []))
    summary = {"version": version, "classes": len(classes), "out": out}
    for split, items in splits.items():
        if not items:
            raise ValueError(f"{root}: no clips for the {split} split")
        sizes = [_num_samples(p) for p, _ in tqdm(items, desc=split, leave=False)]
        write_manifest(os.path.join(out, f"{split}.tsv"), base, [os.path.relpath(p, base) for p, _ in items], sizes)
        write_labels(os.path.join(out, f"{split}.lbl"), [[c] for _, c in items])
        summary[split] = {"clips": len(items), "per_class": dict(Counter(classes[c] for _, c in items))}
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="extracted Speech Commands archive (word folders, validation/testing lists)")
    p.add_argument("out", help="output directory for manifests, labels and classes.txt")
    p.add_argument("--version", type=int, choices=(1, 2), required=True, help="1: SPC-1 (SUPERB, 12), 2: SPC-2 (35)")
    p.add_argument("--test-root", help="SPC-1: extracted speech_commands_test_set_v0.01 (SUPERB's test set)")
    p.add_argument("--allow-partial", action="store_true",
                   help="write an incomplete set (word folders missing, or SPC-1 without --test-root) with a warning "
                        "instead of refusing")
    args = p.parse_args(argv)
    try:
        summary = convert(args.root, args.out, args.version, args.test_root, args.allow_partial)
    except (PartialDataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
