#!/usr/bin/env python
"""`make demo`: pretrain on the built-in demo set, then evaluate; write a report.

1. Generates the demo set (spoken words from eSpeak NG voices + synthesised sound
   classes, deterministic for a seed) with ``examples/prepare/make_demo_data.py``.
2. Computes its fbank normalisation constants with ``examples/prepare/norm_stats.py``.
3. Pretrains a tiny SupMAM model on the CPU through ``fairseq-hydra-train`` (the same
   command line a user runs, with ``+size=tiny``).
4. Trains a tiny CLAP teacher from captions (``examples/teacher``): captions from the demo's
   class names and templates (``captions.py``), a sentencepiece tokenizer
   (``train_tokenizer.py``), ``fairseq-hydra-train --config-name clap +size=tiny`` on the
   train split (1.28 s clips, the student's input length), then zero-shot classification and
   retrieval on the valid split (``zero_shot.py --retrieval``), next to chance.
5. Extracts teacher targets with ``examples/prepare/extract_clap_targets.py`` from two teachers:
   the caption teacher of step 4, and a control: the checkpoint given by ``--clap-checkpoint``
   or ``$MAM_CLAP_TEACHER`` (LAION-CLAP ``630k-audioset-best.pt``, say), or else the caption
   teacher's architecture untrained (random weights), which only checks the pipeline (the demo
   says so).
6. Pretrains a tiny SupMAM-CLAP model from the control's targets, and
7. another from the caption teacher's.
8. Evaluates: a linear probe (logistic regression) on mean-pooled features of each
   frozen pretrained encoder, against the same probe on a randomly initialised encoder.
9. Fine-tunes each pretrained encoder and a randomly initialised one on the demo set
   (``examples/finetuning/config/spcv2.yaml`` +size=tiny: the Speech Commands recipe for
   1 s clips, through ``fairseq-hydra-train``; fixed train / valid split) and scores the
   valid split with ``mam_clap_plugin.inference`` (``evaluate.py``'s code).
10. SUPERB keyword spotting through s3prl (``upstream/run_downstream.py``) on a generated
   keyword set in Speech Commands' layout: the SupMAM encoder as the ``supmam_clap_local``
   upstream against s3prl's ``fbank`` and ``fbank_no_cmvn`` baselines, same data, seed and short CPU schedule
   (``examples/superb/compare_upstreams.py``: table and bar chart).
A new run first removes what an earlier one wrote under OUT_DIR (:data:`DEMO_OUTPUTS`), so
that running ``make demo`` again trains from scratch and gives the same report (fairseq would
otherwise resume the finished runs and train nothing). Writes ``OUT_DIR/report.json``:
   ``{"data": ..., "pretrain": {"checkpoint", "loss_first", "loss_last", ...},
   "caption_teacher": {"checkpoint", "loss_first", "loss_last", "zero_shot": {"accuracy", "chance", ...},
                       "retrieval": {"recall": {"a2t_r1", ...}, "chance": {...}}, ...},
   "pretrain_clap": {..., "teacher": {"checkpoint", "random", "store", ...}},
   "pretrain_clap_caption": {..., "teacher": {...}},
   "evaluate": {"linear_probe": {"supmam", "supmam_clap", "supmam_clap_caption", "random_init"}},
   "finetune": {"supmam": {"accuracy", ...}, "supmam_clap": {...}, "supmam_clap_caption": {...},
                "random_init": {...}, "schedule", ...},
   "superb_ks": {"supmam_clap_local": {"test_acc", ...}, "fbank": {...}, "fbank_no_cmvn": {...},
                 "table", "chart", ...}, "seconds_by_stage": {...}, "seconds_total"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from mam_clap_fixtures.clap import save_random_caption_teacher
from mam_clap_plugin.checkpoint import export_encoder, load_checkpoint, load_encoder, model_config
from mam_clap_plugin.data.dataset import MamClapDataset
from mam_clap_plugin.data.manifest import read_class_list, read_labels, read_manifest
from mam_clap_plugin.hydra_runs import compose_config, run_hydra_train
from mam_clap_plugin.modules.encoder import AudioEncoder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PREPARE = os.path.join(REPO, "examples", "prepare")
TEACHER = os.path.join(REPO, "examples", "teacher")
CONFIG_DIR = os.path.join(REPO, "examples", "pretraining", "config")
TEACHER_CONFIG_DIR = os.path.join(TEACHER, "config")
FINETUNE_CONFIG_DIR = os.path.join(REPO, "examples", "finetuning", "config")
TARGET_LENGTH = 128  # 1.28 s: the demo clips are 1 s long
UPSTREAMS = ("supmam_clap_local", "fbank", "fbank_no_cmvn")  # SUPERB KS comparison
STAGES = 10
#: What a demo run writes under --out-dir (a new run removes them first; nothing else there is touched).
DEMO_OUTPUTS = ("data", "supmam", "caption_teacher", "clap_targets", "caption_targets", "teacher", "supmam_clap",
                "supmam_clap_caption", "finetune", "superb_ks", "report.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="outputs/demo", help="where data, checkpoints and report.json go")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo set and of training")
    p.add_argument("--clips-per-class", type=int, default=24, help="demo clips per class")
    p.add_argument("--max-update", type=int, default=1000, help="pretraining updates")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the tiny model")
    p.add_argument("--clap-checkpoint", default=os.environ.get("MAM_CLAP_TEACHER"),
                   help="teacher of the control SupMAM-CLAP run: a LAION-CLAP .pt (e.g. 630k-audioset-best.pt), "
                        "MS-CLAP 2023 or any file the teacher registry reads; default $MAM_CLAP_TEACHER; without one "
                        "the caption teacher's architecture untrained (random weights) checks the pipeline only")
    p.add_argument("--clap-max-update", type=int, default=1000,
                   help="updates of each SupMAM-CLAP pretraining (as many as SupMAM's, so the runs compare)")
    p.add_argument("--teacher-max-update", type=int, default=250, help="caption teacher training updates")
    p.add_argument("--teacher-batch-size", type=int, default=32, help="caption teacher batch (clips)")
    p.add_argument("--teacher-lr", type=float, default=1e-3, help="peak learning rate of the caption teacher")
    p.add_argument("--finetune-max-update", type=int, default=90, help="updates of each fine-tuning (10 epochs)")
    return p.parse_args(argv)


def clear_previous_run(out_dir: str) -> list[str]:
    """Remove an earlier demo run's outputs (:data:`DEMO_OUTPUTS`) from ``out_dir``; returns what was removed."""
    removed = []
    for name in DEMO_OUTPUTS:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    if removed:
        print(f"   removed the previous demo run's {', '.join(removed)} from {out_dir} (the demo trains from scratch)",
              flush=True)
    return removed


def run_script(name, *args, folder: str = PREPARE) -> str:
    """Run a script of examples/prepare (or ``folder``) and return its stdout."""
    out = subprocess.run([sys.executable, os.path.join(folder, name), *map(str, args)], check=True,
                         stdout=subprocess.PIPE, text=True)
    return out.stdout


def stage(k: int, what: str) -> None:
    print(f"== {k}/{STAGES} {what}", flush=True)


def make_data(data_dir: str, args) -> dict:
    stage(1, f"demo data -> {data_dir}")
    return json.loads(run_script("make_demo_data.py", data_dir, "--clips-per-class", args.clips_per_class,
                                 "--seed", args.seed))


def norm_stats(data_dir: str) -> tuple[float, float]:
    stage(2, "normalisation constants")
    last = run_script("norm_stats.py", os.path.join(data_dir, "train.tsv"), "--target-length", TARGET_LENGTH)
    stats = json.loads(last.strip().splitlines()[-1])
    return stats["norm_mean"], stats["norm_std"]


def pretrain(data_dir: str, run_dir: str, norm: tuple[float, float], args, variant: str = "supmam",
             max_update: int | None = None, extra: tuple = ()) -> dict:
    max_update = max_update or args.max_update
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
        f"optimization.max_update={max_update}",
        "optimization.update_freq=[1]",
        f"optimization.lr=[{args.lr}]",
        f"lr_scheduler.warmup_updates={max(1, max_update // 10)}",
        f"checkpoint.save_dir={ckpt_dir}",
        "checkpoint.save_interval_updates=0",
        # an epoch is only 9 updates: validate and save every 10 epochs (and at the end)
        "dataset.validate_interval=10",
        "checkpoint.save_interval=10",
        *extra,
    ]
    start = time.time()
    run = run_hydra_train(CONFIG_DIR, variant, overrides, run_dir, echo=True)
    losses = run.losses()
    if len(losses) < 2:
        raise RuntimeError(f"too few training log records in {run.log_path}")
    valid = run.records.get("valid", [{}])[-1]
    return {
        "variant": variant,
        "config": f"examples/pretraining/config/{variant}.yaml +size=tiny",
        "checkpoint": os.path.join(ckpt_dir, "checkpoint_last.pt"),
        "log": run.log_path,
        "num_updates": int(run.records["train_inner"][-1]["num_updates"]),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_fell": losses[-1] < losses[0],
        "valid": {k[len("valid_"):]: v for k, v in valid.items() if k.startswith("valid_")},
        "seconds": round(time.time() - start, 1),
    }


def probe_inputs(data_dir: str, norm: tuple[float, float]) -> list:
    """Per split (train, valid): the normalised fbank batches (32 clips each) and the labels."""
    num_classes = len(read_class_list(os.path.join(data_dir, "classes.txt")))
    inputs = []
    for split in ("train", "valid"):
        manifest = read_manifest(os.path.join(data_dir, f"{split}.tsv"))
        labels = read_labels(os.path.join(data_dir, f"{split}.lbl"), len(manifest), num_classes)
        ds = MamClapDataset(manifest, TARGET_LENGTH, norm[0], norm[1], shuffle=False)
        batches = [ds.collater([ds[i] for i in range(start, min(start + 32, len(ds)))])["net_input"]["source"]
                   for start in range(0, len(ds), 32)]
        inputs.append((batches, np.array([lbl[0] for lbl in labels])))
    return inputs


@torch.no_grad()
def pooled_features(encoder: AudioEncoder, batches: list) -> np.ndarray:
    """(num_clips, D) mean over patch tokens of the final encoder output."""
    return torch.cat([encoder.extract_features(b)["x"][:, 1:].mean(dim=1) for b in batches]).numpy()


def linear_probe(encoder: AudioEncoder, inputs: list) -> float:
    """Valid accuracy (%) of a logistic regression on frozen, pooled encoder features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (x_tr, y_tr), (x_va, y_va) = [(pooled_features(encoder, batches), y) for batches, y in inputs]
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x_tr), y_tr)
    return 100.0 * float((clf.predict(scaler.transform(x_va)) == y_va).mean())


def evaluate(checkpoints: dict, data_dir: str, norm: tuple[float, float], seed: int) -> dict:
    """Linear probe of each pretrained encoder ({name: checkpoint}) and of a random one."""
    stage(8, "evaluation: linear probe on frozen encoder features")
    probe = {"metric": "valid accuracy (%)"}
    inputs = probe_inputs(data_dir, norm)
    for name, checkpoint in checkpoints.items():
        probe[name] = linear_probe(load_encoder(checkpoint), inputs)
    torch.manual_seed(seed)
    first = next(iter(checkpoints.values()))
    random_init = AudioEncoder.from_model_config(model_config(load_checkpoint(first), first)).eval()
    probe["random_init"] = linear_probe(random_init, inputs)
    return {"linear_probe": probe}


def finetune(data_dir: str, out_dir: str, norm: tuple[float, float], checkpoints: dict, seed: int,
             max_update: int = 90, batch_size: int = 16, lr: float = 2e-3) -> dict:
    """Fine-tune each pretrained encoder ({name: checkpoint}) and a random one on the demo set.

    Each run is ``fairseq-hydra-train`` with ``examples/finetuning/config/spcv2.yaml +size=tiny``
    (CE with label smoothing, SpecAugment, token masking, waveform mixup, layer decay),
    a short CPU schedule, validated once at the end; the reported accuracy is the valid
    split scored whole-clip by the saved checkpoint (as ``evaluate.py`` does).
    """
    from mam_clap_plugin.inference import evaluate_split, load_classifier

    stage(9, f"fine-tuning (tiny encoders, {max_update} updates each) -> {out_dir}/finetune")
    start = time.time()
    result = {"metric": "valid accuracy (%)", "config": "examples/finetuning/config/spcv2.yaml +size=tiny",
              "schedule": {"max_update": max_update, "batch_size": batch_size, "lr": lr, "seed": seed, "device": "cpu"}}
    for name, checkpoint in {**checkpoints, "random_init": None}.items():
        run_dir = os.path.join(out_dir, "finetune", name)
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        overrides = [
            "+size=tiny", f"task.data={data_dir}", f"task.target_length={TARGET_LENGTH}",
            f"task.norm_stats='{norm[0]:.6f},{norm[1]:.6f}'", "common.cpu=true", f"common.seed={seed}",
            f"common.log_interval={max(1, min(10, max_update // 4))}", f"dataset.batch_size={batch_size}",
            "dataset.num_workers=0",
            f"optimization.max_update={max_update}", "optimization.max_epoch=0", f"optimization.lr=[{lr}]",
            f"lr_scheduler.warmup_updates={max(1, max_update // 10)}", f"checkpoint.save_dir={ckpt_dir}",
            "dataset.validate_interval=1000", "checkpoint.save_interval=1000",  # validate and save at the end
        ]
        if checkpoint:
            overrides.append(f"model.model_path={checkpoint}")
        t0 = time.time()
        run = run_hydra_train(FINETUNE_CONFIG_DIR, "spcv2", overrides, run_dir, env={"OMP_NUM_THREADS": "1"})
        report = evaluate_split(load_classifier(os.path.join(ckpt_dir, "checkpoint_best.pt")), data_dir, "valid",
                                progress=False)
        losses = run.losses()
        result[name] = {"accuracy": report["accuracy"], "mAP": report["mAP"], "encoder": checkpoint,
                        "checkpoint": os.path.join(ckpt_dir, "checkpoint_best.pt"), "log": run.log_path,
                        "loss_first": losses[0], "loss_last": losses[-1], "seconds": round(time.time() - t0, 1)}
        print(f"   {name}: valid accuracy {report['accuracy']:.1f}%", flush=True)
    result["seconds"] = round(time.time() - start, 1)
    return result


def teacher_overrides(data_dir: str, args) -> list[str]:
    """The caption teacher's settings: +size=tiny, the student's clip length, a short CPU schedule."""
    return ["+size=tiny", f"task.data={data_dir}", f"model.clip_seconds={TARGET_LENGTH / 100:g}", "common.cpu=true",
            f"common.seed={args.seed}"]


def caption_teacher(data_dir: str, out_dir: str, args) -> dict:
    """Captions from the class names, a tokenizer, a tiny caption teacher, its zero-shot and retrieval."""
    run_dir = os.path.join(out_dir, "caption_teacher")
    stage(4, f"caption teacher (examples/teacher, tiny, {args.teacher_max_update} updates) -> {run_dir}")
    start = time.time()
    captions = json.loads(run_script("captions.py", data_dir, "--seed", args.seed, folder=TEACHER))
    tokenizer = json.loads(run_script("train_tokenizer.py", data_dir, "--vocab-size", 64, folder=TEACHER))
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    overrides = teacher_overrides(data_dir, args) + [
        "common.log_interval=10",
        f"dataset.batch_size={args.teacher_batch_size}",
        "dataset.num_workers=0",
        f"optimization.max_update={args.teacher_max_update}",
        f"optimization.lr=[{args.teacher_lr}]",
        f"lr_scheduler.warmup_updates={max(1, args.teacher_max_update // 10)}",
        f"checkpoint.save_dir={ckpt_dir}",
        "checkpoint.save_interval_updates=0",
        "dataset.validate_interval=1000",  # validate and save at the end only
        "checkpoint.save_interval=1000",
    ]
    run = run_hydra_train(TEACHER_CONFIG_DIR, "clap", overrides, run_dir)
    losses = run.losses()
    if len(losses) < 2:
        raise RuntimeError(f"too few training log records in {run.log_path}")
    checkpoint = os.path.join(ckpt_dir, "checkpoint_last.pt")
    scores = os.path.join(run_dir, "zero_shot_valid.json")
    run_script("zero_shot.py", checkpoint, data_dir, "valid", "--retrieval", "--json", scores, "--num-workers", 0,
               "--no-progress", folder=TEACHER)
    with open(scores) as f:
        zero_shot = json.load(f)
    cls, ret = zero_shot["classification"], zero_shot["retrieval"]
    valid = run.records.get("valid", [{}])[-1]
    result = {
        "variant": "caption_teacher",
        "config": "examples/teacher/config/clap.yaml +size=tiny",
        "checkpoint": checkpoint,
        "log": run.log_path,
        "captions": captions["train"],
        "tokenizer": {"vocab_size": tokenizer["vocab_size"], "asked": tokenizer["asked"]},
        "num_updates": int(run.records["train_inner"][-1]["num_updates"]),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_fell": losses[-1] < losses[0],
        "valid": {k[len("valid_"):]: v for k, v in valid.items() if k.startswith("valid_")},
        "zero_shot": {"accuracy": cls["accuracy"], "chance": cls["chance"]["accuracy"], "mAP": cls["mAP"],
                      "chance_mAP": cls["chance"]["mAP"], "num_classes": cls["num_classes"],
                      "templates": cls["templates"], "split": "valid"},
        "retrieval": {"recall": ret["recall"], "chance": ret["chance"], "mean_recall": ret["mean_recall"],
                      "num_captions": ret["num_captions"], "split": "valid"},
        "seconds": round(time.time() - start, 1),
    }
    print(f"   caption teacher: loss {losses[0]:.3f} -> {losses[-1]:.3f}; {caption_summary(result)}", flush=True)
    return result


def caption_summary(result: dict) -> str:
    """The caption teacher's valid zero-shot accuracy and retrieval R@1, each next to chance."""
    zs, ret = result["zero_shot"], result["retrieval"]
    return (f"valid zero-shot accuracy {zs['accuracy']:.1f}% (chance {zs['chance']:.1f}%), retrieval R@1 "
            f"audio->text {ret['recall']['a2t_r1']:.1f}% (chance {ret['chance']['a2t_r1']:.1f}%), text->audio "
            f"{ret['recall']['t2a_r1']:.1f}% (chance {ret['chance']['t2a_r1']:.1f}%)")


def control_teacher(data_dir: str, out_dir: str, args) -> dict:
    """The user's CLAP checkpoint, or the caption teacher's architecture untrained (random weights)."""
    if args.clap_checkpoint:
        if not os.path.isfile(args.clap_checkpoint):
            raise FileNotFoundError(f"--clap-checkpoint / MAM_CLAP_TEACHER: {args.clap_checkpoint} does not exist")
        print(f"   control teacher: {args.clap_checkpoint}", flush=True)
        return {"checkpoint": os.path.abspath(args.clap_checkpoint), "random": False}
    path = os.path.join(out_dir, "teacher", "random-caption-clap-tiny.pt")
    cfg = OmegaConf.to_container(compose_config(TEACHER_CONFIG_DIR, "clap", teacher_overrides(data_dir, args)).model)
    with open(os.path.join(data_dir, "spm.model"), "rb") as f:
        save_random_caption_teacher(path, cfg, f.read(), seed=args.seed)
    print("   NOTE: no CLAP checkpoint given (--clap-checkpoint or MAM_CLAP_TEACHER), so the control SupMAM-CLAP run\n"
          "   uses the caption teacher's architecture UNTRAINED (random weights). It only checks the pipeline\n"
          "   (extraction, alignment, loss): its targets carry no CLAP knowledge. Pass 630k-audioset-best.pt for\n"
          "   LAION-CLAP's teacher.", flush=True)
    return {"checkpoint": path, "random": True}


def extract_targets(data_dir: str, out_dir: str, teacher: dict, name: str = "clap_targets") -> dict:
    """Offline teacher targets for the demo's train and valid splits, in ``out_dir/name``."""
    store = os.path.join(out_dir, name)
    start = time.time()
    runs = {}
    for split in ("train", "valid"):
        out = run_script("extract_clap_targets.py", data_dir, split, "--checkpoint", teacher["checkpoint"],
                         "--out", store, "--batch-size", 8, "--num-workers", 1)
        runs[split] = json.loads(out.strip().splitlines()[-1])
    return {**teacher, "store": store, "extraction": runs, "seconds": round(time.time() - start, 1)}


def superb_ks(checkpoint: str, out_dir: str, seed: int, total_steps: int = 400, eval_step: int = 100,
              lr: float = 1e-3, upstreams=UPSTREAMS) -> dict:
    """SUPERB keyword spotting through s3prl on the demo keyword set: the pretrained encoder
    (``supmam_clap_local``) against s3prl's ``fbank`` baselines, a short CPU schedule, same
    data and seed. ``fbank`` normalises each clip to zero mean, which the downstream's mean
    pooling then averages away on these fixed-length clips; ``fbank_no_cmvn`` is the
    informative fbank baseline.

    Builds ``OUT/superb_ks/data`` (``examples/prepare/make_demo_keywords.py``), exports the
    encoder of ``checkpoint`` (``export_encoder``), then runs
    ``examples/superb/compare_upstreams.py`` (train + evaluate per upstream through
    ``upstream/run_downstream.py``). Returns ``{upstream: {"test_acc", ...}, "table", "chart", ...}``.
    """
    stage(10, f"SUPERB keyword spotting (s3prl speech_commands, {total_steps} steps) -> {out_dir}/superb_ks")
    start = time.time()
    ks_dir = os.path.join(out_dir, "superb_ks")
    data = os.path.join(ks_dir, "data")
    sizes = json.loads(run_script("make_demo_keywords.py", data, "--seed", seed, "--no-progress"))["s3prl_sizes"]
    encoder = os.path.join(ks_dir, "encoder.pt")
    export_encoder(checkpoint, encoder)
    specs = {"supmam_clap_local": f"supmam_clap_local:{encoder}"}
    compare_dir = os.path.join(ks_dir, "compare")
    cmd = [sys.executable, os.path.join(REPO, "examples", "superb", "compare_upstreams.py"), "--data", data,
           "--out-dir", compare_dir, "--device", "cpu", "--threads", "1", "--seed", str(seed),
           "--total-steps", str(total_steps), "--eval-step", str(eval_step), "--lr", str(lr), "--num-workers", "0"]
    for name in upstreams:
        cmd += ["--upstream", specs.get(name, name)]
    proc = subprocess.run(cmd, cwd=REPO)
    with open(os.path.join(compare_dir, "compare.json")) as f:
        compare = json.load(f)
    if proc.returncode != 0:
        errors = {k: r["error"] for k, r in compare["results"].items() if "error" in r}
        raise RuntimeError(f"SUPERB KS comparison failed: {errors}")
    keep = ("test_acc", "dev_best_acc", "dev_best_step", "eval_ckpt", "ckpt", "train_seconds", "eval_seconds")
    result = {label: {k: r.get(k) for k in keep} for label, r in compare["results"].items()}
    result.update({
        "metric": "test accuracy (%), 12 classes",
        "data": data, "sizes": sizes, "encoder": encoder,
        "schedule": {"total_steps": total_steps, "eval_step": eval_step, "lr": lr, "batch_size": 32,
                     "device": "cpu", "seed": seed},
        "table": compare["files"]["md"], "chart": compare["files"]["png"], "json": compare["files"]["json"],
        "seconds": round(time.time() - start, 1),
    })
    return result


#: The report's training runs whose loss must fall.
TRAINING_RUNS = ("pretrain", "caption_teacher", "pretrain_clap", "pretrain_clap_caption")
#: The demo's pretrained encoders: name in evaluate / finetune -> report key of their pretraining.
ENCODERS = {"supmam": "pretrain", "supmam_clap": "pretrain_clap", "supmam_clap_caption": "pretrain_clap_caption"}


def losses_that_did_not_fall(report: dict) -> list[str]:
    """Variants of the report's training runs (pretraining and the caption teacher) whose last
    logged loss is not below the first (a NaN counts as not falling); the demo fails if this is
    not empty."""
    runs = [report[key] for key in TRAINING_RUNS if key in report]
    return [run["variant"] for run in runs if not run["loss_last"] < run["loss_first"]]


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    out_dir = os.path.abspath(args.out_dir)
    clear_previous_run(out_dir)
    data_dir = os.path.join(out_dir, "data")
    times = {}

    def timed(name, fn, *a, **kw):
        t0 = time.time()
        value = fn(*a, **kw)
        times[name] = round(time.time() - t0, 1)
        return value

    report = {"data": timed("data", make_data, data_dir, args)}
    norm = timed("norm_stats", norm_stats, data_dir)
    report["data"]["norm_stats"] = list(norm)
    stage(3, f"SupMAM pretraining (tiny model, CPU) -> {out_dir}/supmam")
    report["pretrain"] = timed("pretrain", pretrain, data_dir, os.path.join(out_dir, "supmam"), norm, args)
    report["caption_teacher"] = timed("caption_teacher", caption_teacher, data_dir, out_dir, args)
    stage(5, "teacher targets (examples/prepare/extract_clap_targets.py): the control teacher and the caption teacher")
    control = timed("targets_control", lambda: extract_targets(data_dir, out_dir,
                                                               control_teacher(data_dir, out_dir, args)))
    caption = timed("targets_caption", extract_targets, data_dir, out_dir,
                    {"checkpoint": report["caption_teacher"]["checkpoint"], "random": False}, "caption_targets")
    for k, (name, teacher, what) in enumerate((("supmam_clap", control, "the control teacher"),
                                               ("supmam_clap_caption", caption, "the caption teacher")), start=6):
        key, run_dir = ENCODERS[name], os.path.join(out_dir, name)
        stage(k, f"SupMAM-CLAP pretraining from {what} (tiny model, CPU) -> {run_dir}")
        store = (f"task.target_store={teacher['store']}", f"task.teacher_checkpoint={teacher['checkpoint']}")
        report[key] = timed(key, pretrain, data_dir, run_dir, norm, args, "supmam_clap", args.clap_max_update, store)
        report[key]["teacher"] = teacher
    encoders = {name: report[key]["checkpoint"] for name, key in ENCODERS.items()}
    report["evaluate"] = timed("evaluate", evaluate, encoders, data_dir, norm, args.seed)
    report["finetune"] = timed("finetune", finetune, data_dir, out_dir, norm, encoders, args.seed,
                               args.finetune_max_update)
    report["superb_ks"] = timed("superb_ks", superb_ks, report["pretrain"]["checkpoint"], out_dir, args.seed)
    report["seconds_by_stage"] = times
    report["seconds_total"] = round(time.time() - start, 1)
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    for key in ENCODERS.values():
        pre = report[key]
        print(f"\n{pre['variant']} ({key}): loss {pre['loss_first']:.4f} -> {pre['loss_last']:.4f} in "
              f"{pre['num_updates']} updates ({pre['seconds']} s); valid accuracy of the classification branch "
              f"{pre['valid'].get('accuracy')}")
    if report["pretrain_clap"]["teacher"]["random"]:
        print("(pretrain_clap used an untrained teacher: a pipeline check, not a CLAP result)")
    print(f"caption teacher: {caption_summary(report['caption_teacher'])}")
    ev, ft = report["evaluate"]["linear_probe"], report["finetune"]
    names = (*ENCODERS, "random_init")
    print("linear probe valid accuracy: " + ", ".join(f"{n} {ev[n]:.1f}%" for n in names))
    print("fine-tuned valid accuracy: " + ", ".join(f"{n} {ft[n]['accuracy']:.1f}%" for n in names)
          + f" ({ft['seconds']} s)")
    ks = report["superb_ks"]
    print("SUPERB KS test accuracy: " + ", ".join(
        f"{k} {ks[k]['test_acc']:.1f}%" for k in UPSTREAMS) + f" ({ks['seconds']} s; {ks['table']})")
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in times.items()))
    print(f"report: {path} (demo took {report['seconds_total'] / 60:.1f} min)")
    failed = losses_that_did_not_fall(report)
    if failed:
        print(f"ERROR: the training loss did not fall for {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
