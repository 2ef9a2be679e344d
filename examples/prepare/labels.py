"""Write {split}.lbl (aligned with a manifest) and classes.txt for AudioSet, ESC-50 or Speech Commands.

    python examples/prepare/labels.py audioset MANIFEST_TSV --segments SEG.csv [SEG2.csv ...]
        --class-index class_labels_indices.csv --out-dir DIR [--drop-unlabelled]
    python examples/prepare/labels.py esc50 MANIFEST_TSV --meta meta/esc50.csv --out-dir DIR
    python examples/prepare/labels.py speech_commands MANIFEST_TSV --out-dir DIR [--classes yes,no,...]

The label file is named after the manifest (``train.tsv`` -> ``DIR/train.lbl``). Speech
Commands' classes are its folders: label train first; a later split (valid) then takes the
class list that train wrote in ``DIR/classes.txt``, with a warning for a class it has no clip of.  A manifest
entry without a label is an error naming it; ``--drop-unlabelled`` instead writes the labelled
entries to ``DIR/{split}.tsv``; if that is the input manifest (``--out-dir`` = its folder) it is
replaced and the original kept as ``DIR/{split}.unfiltered.tsv``.  An existing
``DIR/classes.txt`` with different classes is an error, so all splits share one class list.
"""
from __future__ import annotations

import argparse
import csv
import os
import posixpath
import shutil
import sys

from mam_clap_plugin.data.manifest import (
    Manifest,
    ManifestError,
    read_class_list,
    read_manifest,
    write_class_list,
    write_labels,
    write_manifest,
)

BACKGROUND_NOISE = "_background_noise_"


def fail(message: str) -> None:
    """Exit with an error message (no traceback)."""
    raise SystemExit(f"error: {message}")


def stem(relpath: str) -> str:
    """File name without directory and extension."""
    return posixpath.splitext(posixpath.basename(relpath))[0]


def open_csv(path: str):
    """Open a CSV file for reading, or exit naming it if it is missing."""
    if not os.path.isfile(path):
        fail(f"{path}: file not found")
    return open(path, newline="", encoding="utf-8")


def check_columns(reader: csv.DictReader, path: str, required: list[str]) -> None:
    """Exit naming the file if the CSV header lacks a required column."""
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        fail(f"{path}:1: missing CSV column(s) {missing}; header is {reader.fieldnames}")


# --------------------------------------------------------------------------- AudioSet
def read_class_index(path: str) -> tuple[list[str], dict[str, int]]:
    """``class_labels_indices.csv`` (index,mid,display_name) -> (names by index, mid -> index)."""
    names, mid_to_id = [], {}
    with open_csv(path) as f:
        reader = csv.DictReader(f)
        check_columns(reader, path, ["index", "mid", "display_name"])
        for row in reader:
            if row["index"].strip() != str(len(names)):
                fail(f"{path}:{reader.line_num}: expected index {len(names)}, got {row['index']!r}")
            mid_to_id[row["mid"].strip()] = len(names)
            names.append(row["display_name"].strip())
    if not names:
        fail(f"{path}: no classes")
    return names, mid_to_id


def read_segments(paths: list[str], mid_to_id: dict[str, int]) -> dict[str, set[int]]:
    """AudioSet segment CSVs (``YTID, start, end, "mid1,mid2"``) -> YTID -> class ids."""
    table: dict[str, set[int]] = {}
    for path in paths:
        with open_csv(path) as f:
            reader = csv.reader(f, skipinitialspace=True)
            for row in reader:
                if not row or row[0].startswith("#"):
                    continue
                where = f"{path}:{reader.line_num}"
                if len(row) != 4:
                    fail(f"{where}: expected 'YTID, start, end, \"mids\"', got {len(row)} fields")
                ids = table.setdefault(row[0].strip(), set())
                for mid in row[3].split(","):
                    if mid.strip() not in mid_to_id:
                        fail(f"{where}: unknown label id {mid.strip()!r} (not in the class index)")
                    ids.add(mid_to_id[mid.strip()])
    return table


def audioset_labels(args: argparse.Namespace, manifest: Manifest) -> tuple[list[str], list]:
    """Class names and per-entry ids (None = unlabelled), matching YTID = file stem."""
    names, mid_to_id = read_class_index(args.class_index)
    table = read_segments(args.segments, mid_to_id)
    labels = []
    for rel in manifest.paths:
        key = stem(rel)
        if key not in table and key.startswith("Y") and key[1:] in table:
            key = key[1:]
        labels.append(sorted(table[key]) if key in table else None)
    return names, labels


# --------------------------------------------------------------------------- ESC-50
def esc50_labels(args: argparse.Namespace, manifest: Manifest) -> tuple[list[str], list]:
    """Class names (by target id) and per-entry ids from ESC-50's meta CSV, matched by file name."""
    file_to_target, target_to_name = {}, {}
    with open_csv(args.meta) as f:
        reader = csv.DictReader(f)
        check_columns(reader, args.meta, ["filename", "target", "category"])
        for row in reader:
            where = f"{args.meta}:{reader.line_num}"
            try:
                target = int(row["target"])
            except ValueError:
                fail(f"{where}: target {row['target']!r} is not an integer")
            if target_to_name.setdefault(target, row["category"]) != row["category"]:
                fail(f"{where}: target {target} is {row['category']!r} here but "
                     f"{target_to_name[target]!r} earlier")
            file_to_target[row["filename"]] = target
    if sorted(target_to_name) != list(range(len(target_to_name))):
        fail(f"{args.meta}: targets are not 0..K-1: {sorted(target_to_name)}")
    names = [target_to_name[t] for t in range(len(target_to_name))]
    labels = [[file_to_target[posixpath.basename(rel)]] if posixpath.basename(rel) in file_to_target
              else None for rel in manifest.paths]
    return names, labels


# --------------------------------------------------------------------------- Speech Commands
def speech_commands_labels(args: argparse.Namespace, manifest: Manifest) -> tuple[list[str], list]:
    """Class = parent folder name. The classes: ``--classes``; else an existing
    ``DIR/classes.txt`` (so a later split, valid or test, takes train's list, even when the
    random ``--valid-percent`` split left a class out of it); else the sorted folders except
    ``_background_noise_``. A listed class with no clip in this split is a warning; a folder
    missing from an existing list is an error, one missing from ``--classes`` an unlabelled
    entry (see ``--drop-unlabelled``)."""
    folders = [posixpath.basename(posixpath.dirname(rel)) for rel in manifest.paths]
    found = sorted({d for d in folders if d and d != BACKGROUND_NOISE})
    existing = os.path.join(args.out_dir, "classes.txt")
    if args.classes:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
    elif os.path.isfile(existing):
        try:
            names = read_class_list(existing)
        except ManifestError as err:
            fail(str(err))
        extra = [d for d in found if d not in set(names)]
        if extra:
            fail(f"{existing} already exists with different classes: {len(names)}, without the folder(s) {extra} "
                 f"of {manifest.path}. Label the split with every class first (train), use another --out-dir, or "
                 "give --classes for every split")
        print(f"classes from {existing} ({len(names)})")
    else:
        names = found
    if not names:
        fail(f"{manifest.path}: no class folders found")
    absent = [n for n in names if n not in set(found)]
    if absent:
        print(f"warning: {manifest.path}: no clips of {len(absent)} of the {len(names)} classes: "
              f"{', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}", file=sys.stderr)
    class_id = {name: i for i, name in enumerate(names)}
    return names, [[class_id[d]] if d in class_id else None for d in folders]


# --------------------------------------------------------------------------- common
def split_name(manifest_path: str) -> str:
    """``/x/train.tsv`` -> ``train``."""
    return os.path.splitext(os.path.basename(manifest_path))[0]


def write_class_file(out_dir: str, names: list[str]) -> None:
    """Write DIR/classes.txt, refusing to change an existing different one."""
    path = os.path.join(out_dir, "classes.txt")
    try:
        existing = read_class_list(path) if os.path.isfile(path) else names
    except ManifestError as err:
        fail(str(err))
    if existing != names:
        fail(f"{path} already exists with different classes; use another --out-dir "
             "(or the same --classes for every split)")
    write_class_list(path, names)


def drop_unlabelled(manifest: Manifest, labels: list, out_dir: str) -> list[list[int]]:
    """Write DIR/{split}.tsv with the labelled entries only; returns their labels.

    When that is the input manifest itself (``--out-dir`` = the manifest's folder, as in
    docs/data.md), it is replaced atomically and the unfiltered original is kept next to it
    as ``{split}.unfiltered.tsv`` (written once: a rerun keeps the first original)."""
    out_path = os.path.join(out_dir, os.path.basename(manifest.path))
    keep = [i for i, ids in enumerate(labels) if ids is not None]
    if not keep:
        fail(f"{manifest.path}: no entry has a label")
    in_place = os.path.exists(out_path) and os.path.samefile(out_path, manifest.path)
    if in_place:
        original = os.path.join(out_dir, f"{split_name(manifest.path)}.unfiltered.tsv")
        if not os.path.exists(original):
            shutil.copyfile(manifest.path, original)
            print(f"kept the unfiltered {manifest.path} as {original}")
    tmp_path = f"{out_path}.tmp"
    write_manifest(tmp_path, manifest.root, [manifest.paths[i] for i in keep], [manifest.sizes[i] for i in keep])
    os.replace(tmp_path, out_path)
    print(f"wrote {out_path}: {len(keep)} labelled of {len(labels)} entries")
    return [labels[i] for i in keep]


def finish(args: argparse.Namespace, manifest: Manifest, names: list[str], labels: list) -> None:
    """Check for unlabelled entries, then write classes.txt and {split}.lbl."""
    missing = [i for i, ids in enumerate(labels) if ids is None]
    if missing and not args.drop_unlabelled:
        first = missing[0]
        fail(f"{manifest.where(first)}: no label for {manifest.paths[first]} "
             f"({len(missing)} of {len(labels)} entries unlabelled; see --drop-unlabelled)")
    os.makedirs(args.out_dir, exist_ok=True)
    write_class_file(args.out_dir, names)  # first: a class-list conflict must leave the manifest alone
    if args.drop_unlabelled:
        labels = drop_unlabelled(manifest, labels, args.out_dir)
    lbl_path = os.path.join(args.out_dir, f"{split_name(manifest.path)}.lbl")
    write_labels(lbl_path, labels)
    print(f"wrote {lbl_path}: {len(labels)} entries, {len(names)} classes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    commands = {
        "audioset": (audioset_labels, "AudioSet segment CSVs"),
        "esc50": (esc50_labels, "ESC-50 meta/esc50.csv"),
        "speech_commands": (speech_commands_labels, "Speech Commands folder names"),
    }
    subparsers = {}
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=f"labels from {help_text}")
        p.add_argument("manifest", help="the split's .tsv manifest")
        p.add_argument("--out-dir", required=True, help="where to write {split}.lbl and classes.txt")
        p.add_argument("--drop-unlabelled", action="store_true",
                       help="write a filtered DIR/{split}.tsv instead of failing on unlabelled entries "
                            "(the input manifest itself, if it is there: its original is kept as "
                            "DIR/{split}.unfiltered.tsv)")
        p.set_defaults(func=func)
        subparsers[name] = p
    subparsers["audioset"].add_argument("--segments", nargs="+", required=True,
                                        help="segment CSVs (e.g. balanced_train_segments.csv)")
    subparsers["audioset"].add_argument("--class-index", required=True,
                                        help="class_labels_indices.csv")
    subparsers["esc50"].add_argument("--meta", required=True, help="meta/esc50.csv")
    subparsers["speech_commands"].add_argument(
        "--classes", help="comma-separated class names (default: DIR/classes.txt if it exists, else all folders)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        manifest = read_manifest(args.manifest)
    except ManifestError as err:
        fail(str(err))
    names, labels = args.func(args, manifest)
    finish(args, manifest, names, labels)


if __name__ == "__main__":
    main()
