#!/usr/bin/env python
"""Write the class-balanced sampling weights of a split (AudioSet-2M fine-tuning).

    python examples/finetuning/sample_weights.py DATA_DIR [SPLIT] [--out PATH]

Reads ``DATA_DIR/SPLIT.lbl`` (and ``classes.txt``) and writes ``DATA_DIR/SPLIT.weights``:
one line per clip, the sum over its labels of ``1000 / (class count + 0.01)``. The
fine-tuning task reads it with ``task.sample_weights=weights`` and draws
``task.epoch_size`` clips per epoch in proportion to the weights (as2m.yaml: 200,000).
"""
import argparse
import json
import os
import sys

from mam_clap_plugin.data.manifest import read_class_list, read_labels, read_manifest
from mam_clap_plugin.data.sampling import clip_weights, write_weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data_dir", help="directory with SPLIT.tsv, SPLIT.lbl and classes.txt")
    p.add_argument("split", nargs="?", default="train", help="split (default: train)")
    p.add_argument("--labels", default="lbl", help="label file extension")
    p.add_argument("--class-list", default="classes.txt", help="class list inside DATA_DIR")
    p.add_argument("--out", help="output path (default: DATA_DIR/SPLIT.weights)")
    args = p.parse_args(argv)
    num_classes = len(read_class_list(os.path.join(args.data_dir, args.class_list)))
    manifest = read_manifest(os.path.join(args.data_dir, f"{args.split}.tsv"))
    labels = read_labels(os.path.join(args.data_dir, f"{args.split}.{args.labels}"), len(manifest), num_classes)
    weights = clip_weights(labels, num_classes)
    out = args.out or os.path.join(args.data_dir, f"{args.split}.weights")
    write_weights(out, weights)
    print(json.dumps({"out": out, "clips": len(weights), "min": float(weights.min()), "max": float(weights.max())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
