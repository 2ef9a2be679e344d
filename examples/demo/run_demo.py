#!/usr/bin/env python
"""`make demo`: pretrain on the built-in demo set, then evaluate; write a report.

1. Generates the demo set (spoken words from eSpeak NG voices + synthesised sound
   classes, deterministic for a seed) with ``examples/prepare/make_demo_data.py``.
2. Computes its fbank normalisation constants with ``examples/prepare/norm_stats.py``.
3. Pretrains a tiny SupMAM model on the CPU through ``fairseq-hydra-train`` (the same
   command line a user runs, with ``+size=tiny``).
4. Extracts CLAP teacher targets with ``examples/prepare/extract_clap_targets.py``: from
   the checkpoint given by ``--clap-checkpoint`` or ``$MAM_CLAP_TEACHER`` (LAION-CLAP
   ``630k-audioset-best.pt``, say), or else from a randomly initialised HTSAT-tiny
   teacher, which only checks the pipeline (the demo says so).
5. Pretrains a tiny SupMAM-CLAP model from those targets.
6. Evaluates: a linear probe (logistic regression) on mean-pooled features of each
   frozen pretrained encoder, against the same probe on a randomly initialised encoder.
7. Fine-tunes each pretrained encoder and a randomly initialised one on the demo set
   (``examples/finetuning/config/spcv2.yaml`` +size=tiny: the Speech Commands recipe for
   1 s clips, through ``fairseq-hydra-train``; fixed train / valid split) and scores the
   valid split with ``mam_clap_plugin.inference`` (``evaluate.py``'s code).
8. SUPERB keyword spotting through s3prl (``upstream/run_downstream.py``) on a generated
   keyword set in Speech Commands' layout: the SupMAM encoder as the ``supmam_clap_local``
   upstream against s3prl's ``fbank`` and ``fbank_no_cmvn`` baselines, same data, seed and short CPU schedule
   (``examples/superb/compare_upstreams.py``: table and bar chart).
A new run first removes what an earlier one wrote under OUT_DIR (:data:`DEMO_OUTPUTS`), so
that running ``make demo`` again trains from scratch and gives the same report (fairseq would
otherwise resume the finished runs and train nothing). Writes ``OUT_DIR/report.json``:
   ``{"data": ..., "pretrain": {"checkpoint", "loss_first", "loss_last", ...},
   "pretrain_clap": {..., "teacher": {"checkpoint", "random", "store", ...}},
   "evaluate": {"linear_probe": {"supmam", "supmam_clap", "random_init"}},
   "finetune": {"supmam": {"accuracy", ...}, "supmam_clap": {...}, "random_init": {...}, "schedule", ...},
   "superb_ks": {"supmam_clap_local": {"test_acc", ...}, "fbank": {...}, "fbank_no_cmvn": {...},
                 "table", "chart", ...}, "seconds_total"}``.
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

from mam_clap_fixtures.clap import save_random_clap_checkpoint
from mam_clap_plugin.checkpoint import export_encoder, load_checkpoint, load_encoder, model_config
from mam_clap_plugin.data.dataset import MamClapDataset
from mam_clap_plugin.data.manifest import read_class_list, read_labels, read_manifest
from mam_clap_plugin.hydra_runs import run_hydra_train
from mam_clap_plugin.modules.encoder import AudioEncoder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PREPARE = os.path.join(REPO, "examples", "prepare")
CONFIG_DIR = os.path.join(REPO, "examples", "pretraining", "config")
FINETUNE_CONFIG_DIR = os.path.join(REPO, "examples", "finetuning", "config")
TARGET_LENGTH = 128  # 1.28 s: the demo clips are 1 s long
UPSTREAMS = ("supmam_clap_local", "fbank", "fbank_no_cmvn")  # SUPERB KS comparison
#: What a demo run writes under --out-dir (a new run removes them first; nothing else there is touched).
DEMO_OUTPUTS = ("data", "supmam", "clap_targets", "teacher", "supmam_clap", "finetune", "superb_ks", "report.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="outputs/demo", help="where data, checkpoints and report.json go")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo set and of training")
    p.add_argument("--clips-per-class", type=int, default=24, help="demo clips per class")
    p.add_argument("--max-update", type=int, default=1000, help="pretraining updates")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the tiny model")
    p.add_argument("--clap-checkpoint", default=os.environ.get("MAM_CLAP_TEACHER"),
                   help="CLAP teacher for the SupMAM-CLAP run: a LAION-CLAP .pt (e.g. 630k-audioset-best.pt) or "
                        "MS-CLAP 2023 file; default $MAM_CLAP_TEACHER; without one a randomly initialised "
                        "HTSAT-tiny teacher checks the pipeline only")
    p.add_argument("--clap-max-update", type=int, default=600, help="SupMAM-CLAP pretraining updates")
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


def run_script(name, *args) -> str:
    """Run a script of examples/prepare and return its stdout."""
    out = subprocess.run([sys.executable, os.path.join(PREPARE, name), *map(str, args)], check=True,
                         stdout=subprocess.PIPE, text=True)
    return out.stdout


def make_data(data_dir: str, args) -> dict:
    print(f"== 1/8 demo data -> {data_dir}", flush=True)
    return json.loads(run_script("make_demo_data.py", data_dir, "--clips-per-class", args.clips_per_class,
                                 "--seed", args.seed))


def norm_stats(data_dir: str) -> tuple[float, float]:
    print("== 2/8 normalisation constants", flush=True)
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
    print("== 6/8 evaluation: linear probe on frozen encoder features", flush=True)
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

    print(f"== 7/8 fine-tuning (tiny encoders, {max_update} updates each) -> {out_dir}/finetune", flush=True)
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


def clap_teacher(out_dir: str, args) -> dict:
    """The user's CLAP checkpoint, or a randomly initialised HTSAT-tiny in LAION-CLAP's layout."""
    if args.clap_checkpoint:
        if not os.path.isfile(args.clap_checkpoint):
            raise FileNotFoundError(f"--clap-checkpoint / MAM_CLAP_TEACHER: {args.clap_checkpoint} does not exist")
        print(f"   CLAP teacher: {args.clap_checkpoint}", flush=True)
        return {"checkpoint": os.path.abspath(args.clap_checkpoint), "random": False}
    path = os.path.join(out_dir, "teacher", "random-laion-clap-htsat-tiny.pt")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_random_clap_checkpoint(path, "laion", "tiny", seed=args.seed)
    print("   NOTE: no CLAP checkpoint given (--clap-checkpoint or MAM_CLAP_TEACHER), so the SupMAM-CLAP run uses a\n"
          "   RANDOMLY INITIALISED HTSAT-tiny teacher. This only checks the pipeline (extraction, alignment, loss);\n"
          "   its targets carry no CLAP knowledge. Pass 630k-audioset-best.pt for a real teacher.", flush=True)
    return {"checkpoint": path, "random": True}


def extract_targets(data_dir: str, out_dir: str, teacher: dict) -> dict:
    """Offline CLAP targets for the demo's train and valid splits."""
    store = os.path.join(out_dir, "clap_targets")
    start = time.time()
    runs = {}
    for split in ("train", "valid"):
        out = run_script("extract_clap_targets.py", data_dir, split, "--checkpoint", teacher["checkpoint"],
                         "--out", store, "--batch-size", 8, "--num-workers", 1)
        runs[split] = json.loads(out.strip().splitlines()[-1])
    return {**teacher, "store": store, "extraction": runs, "seconds": round(time.time() - start, 1)}


def superb_ks(checkpoint: str, out_dir: str, seed: int, total_steps: int = 800, eval_step: int = 200,
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
    print(f"== 8/8 SUPERB keyword spotting (s3prl speech_commands, {total_steps} steps) -> {out_dir}/superb_ks",
          flush=True)
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


def losses_that_did_not_fall(report: dict) -> list[str]:
    """Variants of the report's pretraining runs whose last logged loss is not below the first
    (a NaN counts as not falling); the demo fails if this is not empty."""
    runs = [report["pretrain"], report["pretrain_clap"]]
    return [run["variant"] for run in runs if not run["loss_last"] < run["loss_first"]]


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    out_dir = os.path.abspath(args.out_dir)
    clear_previous_run(out_dir)
    data_dir = os.path.join(out_dir, "data")
    report = {"data": make_data(data_dir, args)}
    norm = norm_stats(data_dir)
    report["data"]["norm_stats"] = list(norm)
    print(f"== 3/8 SupMAM pretraining (tiny model, CPU) -> {out_dir}/supmam", flush=True)
    report["pretrain"] = pretrain(data_dir, os.path.join(out_dir, "supmam"), norm, args)
    print("== 4/8 CLAP teacher targets (examples/prepare/extract_clap_targets.py)", flush=True)
    teacher = extract_targets(data_dir, out_dir, clap_teacher(out_dir, args))
    print(f"== 5/8 SupMAM-CLAP pretraining (tiny model, CPU) -> {out_dir}/supmam_clap", flush=True)
    report["pretrain_clap"] = pretrain(
        data_dir, os.path.join(out_dir, "supmam_clap"), norm, args, "supmam_clap", args.clap_max_update,
        (f"task.target_store={teacher['store']}", f"task.teacher_checkpoint={teacher['checkpoint']}"),
    )
    report["pretrain_clap"]["teacher"] = teacher
    report["evaluate"] = evaluate({"supmam": report["pretrain"]["checkpoint"],
                                   "supmam_clap": report["pretrain_clap"]["checkpoint"]}, data_dir, norm, args.seed)
    report["finetune"] = finetune(data_dir, out_dir, norm, {"supmam": report["pretrain"]["checkpoint"],
                                                           "supmam_clap": report["pretrain_clap"]["checkpoint"]},
                                  args.seed, args.finetune_max_update)
    report["superb_ks"] = superb_ks(report["pretrain"]["checkpoint"], out_dir, args.seed)
    report["seconds_total"] = round(time.time() - start, 1)
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    ev = report["evaluate"]["linear_probe"]
    for key in ("pretrain", "pretrain_clap"):
        pre = report[key]
        print(f"\n{pre['variant']}: loss {pre['loss_first']:.4f} -> {pre['loss_last']:.4f} in {pre['num_updates']} "
              f"updates ({pre['seconds']} s); valid accuracy of the classification branch "
              f"{pre['valid'].get('accuracy')}")
    if report["pretrain_clap"]["teacher"]["random"]:
        print("(supmam_clap used a randomly initialised teacher: a pipeline check, not a CLAP result)")
    print(f"linear probe valid accuracy: supmam {ev['supmam']:.1f}%, supmam_clap {ev['supmam_clap']:.1f}%, "
          f"random init {ev['random_init']:.1f}%")
    ft = report["finetune"]
    print(f"fine-tuned valid accuracy: supmam {ft['supmam']['accuracy']:.1f}%, supmam_clap "
          f"{ft['supmam_clap']['accuracy']:.1f}%, random init {ft['random_init']['accuracy']:.1f}% ({ft['seconds']} s)")
    ks = report["superb_ks"]
    print("SUPERB KS test accuracy: " + ", ".join(
        f"{k} {ks[k]['test_acc']:.1f}%" for k in UPSTREAMS) + f" ({ks['seconds']} s; {ks['table']})")
    print(f"report: {path} (demo took {report['seconds_total'] / 60:.1f} min)")
    failed = losses_that_did_not_fall(report)
    if failed:
        print(f"ERROR: the pretraining loss did not fall for {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
