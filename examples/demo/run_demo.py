#!/usr/bin/env python
"""`make demo`: pretrain on the built-in demo set, then evaluate; write a report.

1. Generates the demo set (spoken words from eSpeak NG voices + synthesised sound
   classes, deterministic for a seed) with ``examples/prepare/make_demo_data.py``.
2. Computes its fbank normalisation constants with ``examples/prepare/norm_stats.py``.
3. Pretrains a tiny SupMAM model on the CPU through ``fairseq-hydra-train`` (the same
   command line a user runs, with ``+size=tiny``).
4. Evaluates: a linear probe (logistic regression) on mean-pooled features of the
   frozen pretrained encoder, against the same probe on a randomly initialised encoder.
5. Writes ``OUT_DIR/report.json``:
   ``{"data": ..., "pretrain": {"checkpoint", "loss_first", "loss_last", ...},
   "evaluate": {"linear_probe": ...}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from mam_clap_plugin.checkpoint import load_encoder, model_config, load_checkpoint  # noqa: E402
from mam_clap_plugin.data.dataset import MamClapDataset  # noqa: E402
from mam_clap_plugin.data.manifest import read_class_list, read_labels, read_manifest  # noqa: E402
from mam_clap_plugin.hydra_runs import run_hydra_train  # noqa: E402
from mam_clap_plugin.modules.encoder import AudioEncoder  # noqa: E402

PREPARE = os.path.join(REPO, "examples", "prepare")
CONFIG_DIR = os.path.join(REPO, "examples", "pretraining", "config")
TARGET_LENGTH = 128  # 1.28 s: the demo clips are 1 s long


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="outputs/demo", help="where data, checkpoints and report.json go")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo set and of training")
    p.add_argument("--clips-per-class", type=int, default=24, help="demo clips per class")
    p.add_argument("--max-update", type=int, default=1000, help="pretraining updates")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the tiny model")
    return p.parse_args(argv)


def run_script(name, *args) -> str:
    """Run a script of examples/prepare and return its stdout."""
    out = subprocess.run([sys.executable, os.path.join(PREPARE, name), *map(str, args)], check=True,
                         stdout=subprocess.PIPE, text=True)
    return out.stdout


def make_data(data_dir: str, args) -> dict:
    print(f"== 1/4 demo data -> {data_dir}", flush=True)
    return json.loads(run_script("make_demo_data.py", data_dir, "--clips-per-class", args.clips_per_class,
                                 "--seed", args.seed))


def norm_stats(data_dir: str) -> tuple[float, float]:
    print("== 2/4 normalisation constants", flush=True)
    last = run_script("norm_stats.py", os.path.join(data_dir, "train.tsv"), "--target-length", TARGET_LENGTH)
    stats = json.loads(last.strip().splitlines()[-1])
    return stats["norm_mean"], stats["norm_std"]


def pretrain(data_dir: str, run_dir: str, norm: tuple[float, float], args) -> dict:
    print(f"== 3/4 SupMAM pretraining (tiny model, CPU) -> {run_dir}", flush=True)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    overrides = [
        "+size=tiny",
        f"task.data={data_dir}",
        f"task.target_length={TARGET_LENGTH}",
        f"task.norm_stats='{norm[0]:.6f},{norm[1]:.6f}'",
        "common.cpu=true",
        f"common.seed={args.seed}",
        "common.log_interval=10",
        f"dataset.batch_size={args.batch_size}",
        "dataset.num_workers=0",
        f"optimization.max_update={args.max_update}",
        "optimization.update_freq=[1]",
        f"optimization.lr=[{args.lr}]",
        f"lr_scheduler.warmup_updates={max(1, args.max_update // 10)}",
        f"checkpoint.save_dir={ckpt_dir}",
        "checkpoint.save_interval_updates=0",
        # an epoch is only 9 updates: validate and save every 10 epochs (and at the end)
        "dataset.validate_interval=10",
        "checkpoint.save_interval=10",
    ]
    start = time.time()
    run = run_hydra_train(CONFIG_DIR, "supmam", overrides, run_dir, echo=True)
    losses = run.losses()
    if len(losses) < 2:
        raise RuntimeError(f"too few training log records in {run.log_path}")
    valid = run.records.get("valid", [{}])[-1]
    return {
        "variant": "supmam",
        "config": "examples/pretraining/config/supmam.yaml +size=tiny",
        "checkpoint": os.path.join(ckpt_dir, "checkpoint_last.pt"),
        "log": run.log_path,
        "num_updates": int(run.records["train_inner"][-1]["num_updates"]),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_fell": losses[-1] < losses[0],
        "valid": {k[len("valid_"):]: v for k, v in valid.items() if k.startswith("valid_")},
        "seconds": round(time.time() - start, 1),
    }


@torch.no_grad()
def pooled_features(encoder: AudioEncoder, dataset: MamClapDataset) -> np.ndarray:
    """(num_clips, D) mean over patch tokens of the final encoder output."""
    feats = []
    for start in range(0, len(dataset), 32):
        batch = dataset.collater([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
        feats.append(encoder.extract_features(batch["net_input"]["source"])["x"][:, 1:].mean(dim=1))
    return torch.cat(feats).numpy()


def linear_probe(encoder: AudioEncoder, data_dir: str, norm: tuple[float, float]) -> float:
    """Valid accuracy (%) of a logistic regression on frozen, pooled encoder features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    num_classes = len(read_class_list(os.path.join(data_dir, "classes.txt")))
    xy = []
    for split in ("train", "valid"):
        manifest = read_manifest(os.path.join(data_dir, f"{split}.tsv"))
        labels = read_labels(os.path.join(data_dir, f"{split}.lbl"), len(manifest), num_classes)
        ds = MamClapDataset(manifest, TARGET_LENGTH, norm[0], norm[1], shuffle=False)
        xy.append((pooled_features(encoder, ds), np.array([lbl[0] for lbl in labels])))
    (x_tr, y_tr), (x_va, y_va) = xy
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x_tr), y_tr)
    return 100.0 * float((clf.predict(scaler.transform(x_va)) == y_va).mean())


def evaluate(checkpoint: str, data_dir: str, norm: tuple[float, float], seed: int) -> dict:
    print("== 4/4 evaluation: linear probe on frozen encoder features", flush=True)
    pretrained = load_encoder(checkpoint)
    torch.manual_seed(seed)
    random_init = AudioEncoder.from_model_config(model_config(load_checkpoint(checkpoint), checkpoint)).eval()
    return {
        "linear_probe": {
            "metric": "valid accuracy (%)",
            "pretrained": linear_probe(pretrained, data_dir, norm),
            "random_init": linear_probe(random_init, data_dir, norm),
        }
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = os.path.abspath(args.out_dir)
    data_dir = os.path.join(out_dir, "data")
    report = {"data": make_data(data_dir, args)}
    norm = norm_stats(data_dir)
    report["data"]["norm_stats"] = list(norm)
    report["pretrain"] = pretrain(data_dir, os.path.join(out_dir, "supmam"), norm, args)
    report["evaluate"] = evaluate(report["pretrain"]["checkpoint"], data_dir, norm, args.seed)
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    pre, ev = report["pretrain"], report["evaluate"]["linear_probe"]
    print(f"\npretrain: loss {pre['loss_first']:.4f} -> {pre['loss_last']:.4f} in {pre['num_updates']} updates "
          f"({pre['seconds']} s); valid accuracy of the classification branch {pre['valid'].get('accuracy')}")
    print(f"linear probe valid accuracy: pretrained {ev['pretrained']:.1f}% vs random init {ev['random_init']:.1f}%")
    print(f"report: {path}")
    if not pre["loss_fell"]:
        print("ERROR: the pretraining loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
