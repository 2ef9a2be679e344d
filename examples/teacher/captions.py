#!/usr/bin/env python
"""Write caption files (``{split}.cap``) from labels and templates, for data with labels but no captions.

    python examples/teacher/captions.py DATA [--split train --split valid]
        [--template "the sound of {}" ...] [--per-clip K] [--seed S] [--labels lbl] [--class-list classes.txt]

Reads ``DATA/{split}.tsv``, ``DATA/{split}.{labels}`` and ``DATA/{class_list}`` (the files the
pretraining and fine-tuning tasks read) and writes ``DATA/{split}.cap``: per clip, each template
filled with its labels (underscores as spaces; a multi-label clip as "a, b and c"), in an order
drawn per clip, joined by `` ||| ``. ``--per-clip K`` keeps K of them. Default templates:
"the sound of {}", "a recording of {}", "an audio clip of {}", "we hear {}".
Prints one JSON line: ``{"split": {"clips", "captions_per_clip", "distinct_captions", "file"}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mam_clap_plugin.data.captions import DEFAULT_TEMPLATES, caption_rows, check_templates, write_captions
from mam_clap_plugin.data.manifest import ManifestError, read_class_list, read_labels, read_manifest


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("data", help="directory with {split}.tsv, {split}.lbl and classes.txt; gets {split}.cap")
    p.add_argument("--split", action="append", help="split to caption (repeatable; default: train and valid)")
    p.add_argument("--template", action="append",
                   help="caption template with one {} for the labels (repeatable; default: "
                        + "; ".join(repr(t) for t in DEFAULT_TEMPLATES) + ")")
    p.add_argument("--per-clip", type=int, default=0, help="captions per clip (0: one per template)")
    p.add_argument("--seed", type=int, default=0, help="seed of each clip's template order")
    p.add_argument("--labels", default="lbl", help="label file extension: {split}.EXT")
    p.add_argument("--class-list", default="classes.txt", help="class list inside DATA")
    p.add_argument("--ext", default="cap", help="caption file extension: {split}.EXT")
    args = p.parse_args(argv)
    args.split = args.split or ["train", "valid"]
    try:
        args.template = check_templates(args.template or DEFAULT_TEMPLATES)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = read_class_list(os.path.join(args.data, args.class_list))
    report = {}
    for split in args.split:
        manifest = read_manifest(os.path.join(args.data, f"{split}.tsv"))
        labels = read_labels(os.path.join(args.data, f"{split}.{args.labels}"), len(manifest), len(names))
        rows = caption_rows(labels, names, args.template, args.per_clip, args.seed)
        path = os.path.join(args.data, f"{split}.{args.ext}")
        write_captions(path, rows)
        report[split] = {"clips": len(rows), "captions_per_clip": len(rows[0]),
                         "distinct_captions": len({c for row in rows for c in row}), "file": path}
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except (ManifestError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
