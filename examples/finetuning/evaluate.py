#!/usr/bin/env python
"""Evaluate a fine-tuned checkpoint on one split: mAP, accuracy and the clip count.

    python examples/finetuning/evaluate.py CKPT DATA_DIR SPLIT [--json OUT.json]

DATA_DIR holds ``SPLIT.tsv``, ``SPLIT.lbl`` and ``classes.txt`` (the manifest formats of
training); the class list must be the one the checkpoint was fine-tuned on. CKPT is a
fine-tuning checkpoint or an encoder export that keeps a classifier head (a converted
fine-tuned AudioMAE file), whose class names are then DATA_DIR's class list (its length must
be the head's output count). Every clip is
scored whole: clips longer than the checkpoint's ``task.target_length`` are cut into
windows of that length whose probabilities are averaged. mAP is the macro average
precision over the classes with a positive clip in the split (the others are counted in
``classes_left_out``); accuracy is top-1 (the best-scoring class is one of the clip's labels).

Writes a JSON report (default ``CKPT_DIR/eval_SPLIT.json``) with the per-class AP and, for a
multi-label (BCE) model, the five best and five worst classes by name.
"""
import argparse
import json
import os
import sys
import time

import torch

from mam_clap_plugin.checkpoint import CheckpointError
from mam_clap_plugin.data.manifest import ManifestError
from mam_clap_plugin.inference import evaluate_split, load_classifier


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="fine-tuned checkpoint (checkpoint_best.pt) or an encoder export with a head")
    p.add_argument("data_dir", help="directory with SPLIT.tsv, SPLIT.lbl and classes.txt")
    p.add_argument("split", help="split name, e.g. eval, valid, test")
    p.add_argument("--json", help="report path (default: CKPT_DIR/eval_SPLIT.json)")
    p.add_argument("--labels", default="lbl", help="label file extension (SPLIT.EXT)")
    p.add_argument("--class-list", default="classes.txt", help="class list inside DATA_DIR")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    try:
        clf = load_classifier(args.checkpoint, os.path.join(args.data_dir, args.class_list))
    except (CheckpointError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report = evaluate_split(clf, args.data_dir, args.split, args.labels, args.class_list, not args.no_progress)
    report["checkpoint"] = os.path.abspath(args.checkpoint)
    report["seconds"] = round(time.time() - start, 2)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval_{args.split}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{args.split}: mAP {report['mAP']:.2f}  accuracy {report['accuracy']:.2f}  clips {report['num_clips']}"
          f"  (classes without a positive: {report['classes_left_out']}; report {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
