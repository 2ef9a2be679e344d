#!/usr/bin/env python
"""Lay out Speech Commands v0.01 as s3prl's SUPERB keyword-spotting task (``speech_commands``) reads it.

SUPERB KS uses the two official v0.01 archives:

* ``speech_commands_v0.01.tar.gz`` (train archive): 30 word folders (``bed`` ... ``zero``),
  ``_background_noise_/`` (6 noise recordings), ``validation_list.txt``,
  ``testing_list.txt``, ``README.md``, ``LICENSE``;
* ``speech_commands_test_set_v0.01.tar.gz`` (test archive): the 12 class folders ``yes no up
  down left right on off stop go _unknown_ _silence_``.

s3prl (``downstream/speech_commands``) reads

* ``speech_commands_root``: every sub-folder except ``_background_noise_`` is a word (the 10
  keywords keep their class, every other word becomes ``_unknown_``); it ignores the two
  list files and splits train / dev itself by the SHA-1 of the file name before
  ``_nohash_`` (~10 % dev, ~10 % dropped, the rest train); each ``_background_noise_/*.wav``
  is a ``_silence_`` item of both train and dev, cropped to a random 1 s;
* ``speech_commands_test_root``: the test archive's 12 folders, read as they are (a folder
  name outside those 12 makes s3prl fail).

This script builds ``OUT/train`` (word folders + ``_background_noise_``) and ``OUT/test``
(the 12 folders) from the extracted archives, as directory symlinks (default) or copies,
or by extracting the ``.tar.gz`` files directly, and checks what s3prl relies on.  Then::

    d=config.downstream_expert.datarc
    python upstream/run_downstream.py -m train -d speech_commands -u fbank -p exp/ks_fbank \\
        -c upstream/config/speech_commands.yaml \\
        -o "$d.speech_commands_root=OUT/train,,$d.speech_commands_test_root=OUT/test"

Usage::

    python examples/prepare/speech_commands_s3prl.py --train EXTRACTED_TRAIN_DIR_OR_TAR_GZ \\
        --test EXTRACTED_TEST_DIR_OR_TAR_GZ --out OUT [--mode symlink|copy] [--force]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mam_clap_plugin.data.speech_commands import CLASSES as TEST_CLASSES
from mam_clap_plugin.data.speech_commands import KEYWORDS, s3prl_bucket  # s3prl's hash split, tested against s3prl

NOISE = "_background_noise_"
#: Words only in Speech Commands v0.02 (SUPERB KS is defined on v0.01).
V2_ONLY_WORDS = ("backward", "forward", "follow", "learn", "visual")
TRAIN_ARCHIVE = "speech_commands_v0.01.tar.gz"
TEST_ARCHIVE = "speech_commands_test_set_v0.01.tar.gz"


class LayoutError(Exception):
    """The input does not look like what s3prl needs (message says why)."""


def _wav_count(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.wav"))


def _subdirs(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def check_train_root(root: Path, any_version: bool = False) -> Dict:
    """Validate a train root (word folders + ``_background_noise_``); returns its counts."""
    import soundfile

    if not root.is_dir():
        raise LayoutError(f"train root {root} is not a directory")
    dirs = {p.name: p for p in _subdirs(root)}
    if "_silence_" in dirs or "_unknown_" in dirs:
        raise LayoutError(f"{root} has _silence_/_unknown_ folders: that is the test archive "
                          f"({TEST_ARCHIVE}), not the train archive ({TRAIN_ARCHIVE})")
    if NOISE not in dirs:
        raise LayoutError(f"{root} has no {NOISE}/ folder (the train archive {TRAIN_ARCHIVE} has one; "
                          "s3prl trains its _silence_ class on it)")
    noise = sorted(dirs[NOISE].glob("*.wav"))
    if not noise:
        raise LayoutError(f"{dirs[NOISE]} holds no .wav files")
    short = [p.name for p in noise if soundfile.info(str(p)).duration < 1.0]
    if short:
        raise LayoutError(f"noise files shorter than 1 s in {dirs[NOISE]} (s3prl crops 1 s): {short}")
    words = {name: p for name, p in dirs.items() if name != NOISE}
    missing = [k for k in KEYWORDS if k not in words]
    if missing:
        raise LayoutError(f"{root} lacks keyword folders {missing}")
    v2 = [w for w in V2_ONLY_WORDS if w in words]
    if v2 and not any_version:
        raise LayoutError(f"{root} has v0.02-only words {v2}: SUPERB KS uses Speech Commands v0.01 "
                          f"({TRAIN_ARCHIVE}); pass --any-version to use it anyway")
    split = {"train": 0, "dev": 0, "dropped": 0}
    no_hash = 0
    for p in words.values():
        for wav in p.glob("*.wav"):
            if "_nohash_" not in wav.name:
                no_hash += 1
            bucket = s3prl_bucket(wav.name)
            split["dropped" if bucket == "test" else bucket] += 1
    if no_hash:
        print(f"warning: {no_hash} files in {root} have no '_nohash_' in their name; s3prl then "
              "hashes the whole name, so one speaker's clips can land in both train and dev", file=sys.stderr)
    return {
        "words": {name: _wav_count(p) for name, p in words.items()},
        "background_noise": [p.name for p in noise],
        # as s3prl counts: the noise files are _silence_ items of train and of dev
        "s3prl_train": split["train"] + len(noise),
        "s3prl_dev": split["dev"] + len(noise),
        "dropped_by_s3prl": split["dropped"],
    }


def check_test_root(root: Path) -> Dict[str, int]:
    """Validate a test root (exactly s3prl's 12 class folders); returns clips per class."""
    if not root.is_dir():
        raise LayoutError(f"test root {root} is not a directory")
    dirs = {p.name: p for p in _subdirs(root)}
    extra = sorted(set(dirs) - set(TEST_CLASSES))
    missing = [c for c in TEST_CLASSES if c not in dirs]
    if extra or missing:
        hint = f" ({NOISE} is in the train archive {TRAIN_ARCHIVE})" if NOISE in extra else ""
        raise LayoutError(f"{root} must hold exactly s3prl's 12 class folders {list(TEST_CLASSES)} "
                          f"(the test archive {TEST_ARCHIVE}); missing {missing}, unexpected {extra}{hint}")
    counts = {c: _wav_count(dirs[c]) for c in TEST_CLASSES}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise LayoutError(f"class folders without .wav files in {root}: {empty}")
    return counts


def _extract(archive: Path, dest: Path) -> Path:
    """Extract a .tar.gz into ``dest``; returns the folder that holds the data (the archive's
    single top-level folder, if it has one)."""
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():  # archive with one top-level folder: flatten
        inner = entries[0]
        for child in list(inner.iterdir()):
            child.rename(dest / child.name)
        inner.rmdir()
    return dest


def _link_or_copy(src: Path, dest: Path, names: Sequence[str], mode: str) -> None:
    dest.mkdir(parents=True)
    for name in names:
        if mode == "symlink":
            (dest / name).symlink_to((src / name).resolve(), target_is_directory=True)
        else:
            shutil.copytree(src / name, dest / name)


def _clear(path: Path, force: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise LayoutError(f"{path} exists; pass --force to replace it")
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)  # removes the symlinks inside, never their targets


def _check_root(key: str, root: Path, any_version: bool) -> Dict:
    return check_train_root(root, any_version) if key == "train" else check_test_root(root)


def prepare(train: str, test: str, out: str, mode: str = "symlink", force: bool = False,
            any_version: bool = False) -> Dict:
    """Build ``out/train`` and ``out/test``; returns a summary (also written to ``out/layout.json``)."""
    if mode not in ("symlink", "copy"):
        raise ValueError("mode must be 'symlink' or 'copy'")
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    roots, checks = {}, {}  # checks: the summary of each root, from its one check
    for key, src in (("train", Path(train)), ("test", Path(test))):
        dest = out_dir / key
        if src.resolve() == dest:
            raise LayoutError(f"--{key} {src} is the output folder itself")
        _clear(dest, force)
        if src.is_file():
            roots[key] = _extract(src, dest)
            checks[key] = _check_root(key, roots[key], any_version)
            continue
        if not src.is_dir():
            raise LayoutError(f"--{key} {src} is neither a directory nor an archive file")
        # Checked before linking anything; the links / copies hold the same folders, so
        # the result describes the destination too.
        checks[key] = _check_root(key, src, any_version)
        names = [p.name for p in _subdirs(src)] if key == "train" else list(TEST_CLASSES)
        _link_or_copy(src, dest, names, mode)
        roots[key] = dest
    summary = {
        "speech_commands_root": str(roots["train"]),
        "speech_commands_test_root": str(roots["test"]),
        "mode": "extracted" if Path(train).is_file() else mode,
        "train": checks["train"],
        "test": checks["test"],
        "override": (f"config.downstream_expert.datarc.speech_commands_root={roots['train']},,"
                     f"config.downstream_expert.datarc.speech_commands_test_root={roots['test']}"),
    }
    with open(out_dir / "layout.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"inputs: {TRAIN_ARCHIVE} and {TEST_ARCHIVE}, extracted or as archives")
    p.add_argument("--train", required=True, help=f"extracted {TRAIN_ARCHIVE} (or the archive itself)")
    p.add_argument("--test", required=True, help=f"extracted {TEST_ARCHIVE} (or the archive itself)")
    p.add_argument("--out", required=True, help="output folder: gets train/, test/ and layout.json")
    p.add_argument("--mode", choices=("symlink", "copy"), default="symlink",
                   help="link the input folders (default) or copy them (ignored for archives: extracted)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT/train and OUT/test")
    p.add_argument("--any-version", action="store_true",
                   help="accept a train root with Speech Commands v0.02 words (not SUPERB)")
    args = p.parse_args(argv)
    try:
        summary = prepare(args.train, args.test, args.out, args.mode, args.force, args.any_version)
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
