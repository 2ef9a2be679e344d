#!/usr/bin/env python
"""ESC-50 5-fold cross-validation: five fine-tunings, per-fold and mean +- std accuracy.

    python examples/finetuning/esc50_cv.py ESC50_ROOT --out esc50_cv \\
        model.model_path=checkpoints/supmam_clap/checkpoint_last.pt

ESC50_ROOT is the extracted ESC-50 repository (``meta/esc50.csv``, ``audio/*.wav``). For
fold k this builds ``OUT/fold{k}/data`` (``train``: the other four folds, ``valid``: fold
k; ``classes.txt``: the 50 categories by target id), fine-tunes with
``examples/finetuning/config/esc50.yaml`` through ``fairseq-hydra-train`` in
``OUT/fold{k}`` (checkpoints in ``OUT/fold{k}/checkpoints``), then scores fold k with the
best checkpoint (``evaluate.py``'s code: whole clips). Every argument after the options
is a Hydra override passed to each fine-tuning (``model.model_path=...``, ``+size=tiny``, ...).

Resumable: a finished fold (``OUT/fold{k}/result.json``) is skipped, an interrupted one
resumes from its ``checkpoint_last.pt``. Writes ``OUT/esc50_cv.json`` and ``OUT/esc50_cv.md``
(std: the sample standard deviation over the folds).
"""
import argparse
import csv
import json
import os
import sys
import time

import numpy as np

from mam_clap_plugin.data.manifest import write_class_list, write_labels, write_manifest
from mam_clap_plugin.hydra_runs import run_hydra_train
from mam_clap_plugin.inference import evaluate_split, load_classifier

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def read_meta(root: str):
    """Rows of ``meta/esc50.csv`` (filename, fold, target, category) and the class names by target."""
    path = os.path.join(root, "meta", "esc50.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: ESC-50 metadata not found (is {root} the ESC-50 repository?)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("filename", "fold", "target", "category"):
        if rows and key not in rows[0]:
            raise ValueError(f"{path}: column {key!r} missing")
    names = {}
    for row in rows:
        names.setdefault(int(row["target"]), row["category"])
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: class targets are not 0..{len(names) - 1}")
    return rows, [names[i] for i in range(len(names))]


def build_fold(root: str, rows, classes, fold: int, data_dir: str) -> dict:
    """``data_dir/{train,valid}.{tsv,lbl}`` and ``classes.txt`` for ``fold`` held out."""
    import soundfile as sf

    os.makedirs(data_dir, exist_ok=True)
    audio = os.path.join(os.path.abspath(root), "audio")
    counts = {}
    for split, keep in (("train", lambda r: int(r["fold"]) != fold), ("valid", lambda r: int(r["fold"]) == fold)):
        chosen = [r for r in rows if keep(r)]
        if not chosen:
            raise ValueError(f"fold {fold}: no clips for {split}")
        sizes = [sf.info(os.path.join(audio, r["filename"])).frames for r in chosen]
        write_manifest(os.path.join(data_dir, f"{split}.tsv"), audio, [r["filename"] for r in chosen], sizes)
        write_labels(os.path.join(data_dir, f"{split}.lbl"), [[int(r["target"])] for r in chosen])
        counts[split] = len(chosen)
    write_class_list(os.path.join(data_dir, "classes.txt"), classes)
    return counts


def summarise(results: dict) -> dict:
    acc = np.array([results[k]["accuracy"] for k in sorted(results)])
    return {"folds": results, "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0}


def markdown(summary: dict) -> str:
    lines = ["| fold | clips | accuracy (%) |", "|---|---|---|"]
    for k in sorted(summary["folds"], key=int):
        r = summary["folds"][k]
        lines.append(f"| {k} | {r['num_clips']} | {r['accuracy']:.2f} |")
    lines.append(f"| mean +- std | | {summary['mean']:.2f} +- {summary['std']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="ESC-50 repository (meta/esc50.csv, audio/)")
    p.add_argument("--out", default="esc50_cv", help="output directory (one sub-directory per fold)")
    p.add_argument("--config-name", default="esc50", help="config in examples/finetuning/config")
    p.add_argument("--folds", default="1,2,3,4,5", help="comma-separated folds to run")
    p.add_argument("--echo", action="store_true", help="print the training logs")
    args, overrides = p.parse_known_args(argv)
    out = os.path.abspath(args.out)
    rows, classes = read_meta(args.root)
    results = {}
    for fold in (int(k) for k in args.folds.split(",")):
        fold_dir = os.path.join(out, f"fold{fold}")
        result_path = os.path.join(fold_dir, "result.json")
        if os.path.isfile(result_path):
            with open(result_path) as f:
                results[str(fold)] = json.load(f)
            print(f"fold {fold}: done earlier ({results[str(fold)]['accuracy']:.2f} %)", flush=True)
            continue
        data = os.path.join(fold_dir, "data")
        counts = build_fold(args.root, rows, classes, fold, data)
        print(f"fold {fold}: {counts['train']} train / {counts['valid']} valid clips", flush=True)
        start = time.time()
        ckpt = os.path.join(fold_dir, "checkpoints")
        run_hydra_train(CONFIG_DIR, args.config_name, [f"task.data={data}", f"checkpoint.save_dir={ckpt}", *overrides],
                        fold_dir, echo=args.echo)
        report = evaluate_split(load_classifier(os.path.join(ckpt, "checkpoint_best.pt")), data, "valid",
                                progress=False)
        result = {"accuracy": report["accuracy"], "num_clips": report["num_clips"],
                  "checkpoint": os.path.join(ckpt, "checkpoint_best.pt"), "seconds": round(time.time() - start, 1)}
        with open(result_path, "w") as f:
            json.dump(result, f, indent=2)
        results[str(fold)] = result
        print(f"fold {fold}: accuracy {result['accuracy']:.2f} %", flush=True)
    summary = summarise(results)
    with open(os.path.join(out, "esc50_cv.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown(summary)
    with open(os.path.join(out, "esc50_cv.md"), "w") as f:
        f.write(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
