"""Fine-tuning runs through `fairseq-hydra-train` (tiny size, generated data).

Fine-tuning beats chance for a single-label (esc50) and a multi-label (as20k, 2 gloo processes)
recipe, a resumed run follows the uninterrupted one, the 2-process validation mAP equals a
single-process evaluation of the checkpoint, and evaluate.py / predict.py read it."""
import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from mam_clap_plugin.data.manifest import write_class_list, write_labels, write_manifest
from mam_clap_plugin.hydra_runs import hydra_train_executable, parse_json_log, plugin_dir, run_hydra_train

from .conftest import REPO
from .helpers import free_port, model_cfg, task_cfg

pytestmark = pytest.mark.slow  # every test trains through fairseq-hydra-train

FT_CONFIG_DIR = os.path.join(REPO, "examples", "finetuning", "config")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 shared cores: one thread per process avoids oversubscription


def write_chord_set(root, counts=(("train", 24), ("valid", 12)), seconds=0.6, seed=0):
    """Multi-label clips: each holds a random non-empty subset of three tones."""
    rng = np.random.default_rng(seed)
    audio = os.path.join(root, "audio")
    os.makedirs(audio, exist_ok=True)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    for split, count in counts:
        names, labels = [], []
        for i in range(count):
            ids = [c for c in range(3) if rng.random() < 0.5] or [int(rng.integers(3))]
            x = sum(0.3 * np.sin(2 * np.pi * 220 * 2**c * t + rng.uniform(0, 6)) for c in ids)
            x = x + 0.05 * rng.standard_normal(n)
            names.append(f"{split}_{i}.wav")
            sf.write(os.path.join(audio, names[-1]), x.astype(np.float32), 16000)
            labels.append(ids)
        write_manifest(os.path.join(root, f"{split}.tsv"), audio, names, [n] * count)
        write_labels(os.path.join(root, f"{split}.lbl"), labels)
    write_class_list(os.path.join(root, "classes.txt"), ["low", "mid", "high"])
    return root


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    from .conftest import write_tone_set

    return write_tone_set(str(tmp_path_factory.mktemp("ft_train_tones")), counts=(("train", 24), ("valid", 12)))


def overrides(data, save_dir, *extra):
    return [
        "+size=tiny",
        f"task.data={data}",
        "task.target_length=64",
        "task.timem=16",  # the recipes' masks are for 5-10 s clips; these are 0.6 s
        "common.cpu=true",
        "common.log_interval=1",
        "dataset.batch_size=6",
        "dataset.num_workers=0",
        "optimization.lr=[0.002]",
        "optimization.max_epoch=0",
        "lr_scheduler.warmup_updates=2",
        f"checkpoint.save_dir={save_dir}",
        *extra,
    ]


def run_script(capsys, monkeypatch, script, *args) -> str:
    """Run an examples/ script as __main__ in this process (its imports are already paid); its stdout."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(REPO, "examples", script), run_name="__main__")
    assert done.value.code == 0
    return capsys.readouterr().out


def test_single_label_finetune_beats_chance_and_resumes(tones, tmp_path, capsys, monkeypatch):
    common = ["optimization.max_update=24"]
    straight = run_hydra_train(FT_CONFIG_DIR, "esc50", overrides(tones, tmp_path / "a", *common,
                                                                 "checkpoint.no_epoch_checkpoints=false"),
                               tmp_path / "ra", env=ONE_THREAD)
    losses = straight.losses()
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    valid = straight.records["valid"]
    assert valid[-1]["valid_accuracy"] > 60, valid  # chance: 33 %
    assert "valid_best_accuracy" in valid[-1]
    assert os.path.isfile(tmp_path / "a" / "checkpoint_best.pt")

    # resume from the end of epoch 2 (8 updates) into a fresh save dir: the same trajectory
    resumed = run_hydra_train(FT_CONFIG_DIR, "esc50", overrides(
        tones, tmp_path / "b", *common, f"checkpoint.restore_file={tmp_path / 'a' / 'checkpoint2.pt'}"),
        tmp_path / "rb", env=ONE_THREAD)
    assert "loaded checkpoint" in resumed.text.lower()
    assert resumed.losses() == pytest.approx(losses[8:], abs=1e-4)
    assert [r["lr"] for r in resumed.records["train_inner"]] == pytest.approx(
        [r["lr"] for r in straight.records["train_inner"][8:]])

    # evaluate.py on the best checkpoint: same accuracy as the best validation
    out = tmp_path / "eval.json"
    stdout = run_script(capsys, monkeypatch, "finetuning/evaluate.py", str(tmp_path / "a" / "checkpoint_best.pt"),
                        tones, "valid", "--json", str(out), "--no-progress")
    report = json.loads(out.read_text())
    assert report["num_clips"] == 12
    assert report["accuracy"] == pytest.approx(max(r["valid_accuracy"] for r in valid), abs=1e-3)
    assert "accuracy" in stdout and "mAP" in stdout


def test_two_process_multilabel_finetune_matches_single_process_map(tmp_path, capsys, monkeypatch):
    from mam_clap_plugin.inference import evaluate_split, load_classifier

    data = write_chord_set(str(tmp_path / "chords"))
    port = free_port()
    ddp = [
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.ddp_backend=legacy_ddp",
        f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
        "distributed_training.distributed_no_spawn=true",
        "optimization.max_update=20",
        "dataset.batch_size=3",
        "dataset.validate_interval=100",  # validate at the end only
        "task.mixup=0.0",
    ]
    procs = []
    for rank in (0, 1):
        run_dir = tmp_path / f"rank{rank}"
        run_dir.mkdir()
        cmd = [hydra_train_executable(), "--config-dir", FT_CONFIG_DIR, "--config-name", "as20k",
               *overrides(data, tmp_path / "ckpt", *ddp), f"distributed_training.distributed_rank={rank}",
               f"common.user_dir={plugin_dir()}", f"hydra.run.dir={run_dir}"]
        procs.append(subprocess.Popen(cmd, cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, **ONE_THREAD}))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    records = parse_json_log(outs[0])
    assert all(r["nsentences"] == 6 for r in records["train_inner"])
    valid = records["valid"][-1]
    assert valid["valid_mAP_classes_left_out"] == 0
    # both ranks report the mAP of all 12 clips
    assert parse_json_log(outs[1]).get("valid", [valid])[-1]["valid_mAP"] == valid["valid_mAP"]

    clf = load_classifier(str(tmp_path / "ckpt" / "checkpoint_last.pt"))
    single = evaluate_split(clf, data, "valid", progress=False)
    assert single["num_clips"] == 12
    assert single["mAP"] == pytest.approx(valid["valid_mAP"], abs=1e-3)
    assert single["accuracy"] == pytest.approx(valid["valid_accuracy"], abs=1e-3)
    # chance mAP is each class's positive rate
    labels = [list(map(int, line.split(","))) for line in open(os.path.join(data, "valid.lbl"))]
    chance = 100 * np.mean([np.mean([c in ids for ids in labels]) for c in range(3)])
    assert single["mAP"] > chance + 10, (single["mAP"], chance)
    assert len(single["best_classes"]) == 3 and single["best_classes"][0][1] >= single["worst_classes"][0][1]

    # predict.py: top-k names and scores, as JSON
    wav = os.path.join(data, "audio", "valid_0.wav")
    ckpt = str(tmp_path / "ckpt" / "checkpoint_last.pt")
    pred = json.loads(run_script(capsys, monkeypatch, "predict.py", wav, "--checkpoint", ckpt, "--top-k", "2",
                                 "--json"))
    assert pred[0]["file"] == wav and len(pred[0]["top"]) == 2
    assert {p["class"] for p in pred[0]["top"]} <= {"low", "mid", "high"}
    assert torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)["task_state"]["class_names"]

    # a fine-tuned checkpoint is a model_path too (its encoder; the head starts afresh)
    from mam_clap_plugin.tasks.mam_clap_finetuning import MamClapFinetuningTask

    task = MamClapFinetuningTask.setup_task(task_cfg(data))
    again = task.build_model(model_cfg(model_path=str(tmp_path / "ckpt" / "checkpoint_last.pt")))
    assert torch.equal(again.encoder.blocks[0].attn.qkv.weight, clf.model.encoder.blocks[0].attn.qkv.weight)


def write_esc50_layout(root, seconds=0.6):
    """ESC-50's layout (meta/esc50.csv, audio/) with three tone classes, two clips per class and fold."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "audio"))
    os.makedirs(os.path.join(root, "meta"))
    n = int(seconds * 44100)
    t = np.arange(n) / 44100
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, category in enumerate(["low", "mid", "high"]):
            for i in range(2):
                name = f"{fold}-{target}{i}-A-{target}.wav"
                x = 0.3 * np.sin(2 * np.pi * 220 * 2**target * t + rng.uniform(0, 6)) + 0.05 * rng.standard_normal(n)
                sf.write(os.path.join(root, "audio", name), x.astype(np.float32), 44100)
                lines.append(f"{name},{fold},{target},{category},False,{target}{i},A")
    open(os.path.join(root, "meta", "esc50.csv"), "w").write("\n".join(lines) + "\n")
    return root


def test_esc50_cv_runs_a_fold_and_resumes(tmp_path, capsys, monkeypatch):
    root = write_esc50_layout(str(tmp_path / "ESC-50"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--out", str(tmp_path / "cv"), "--folds", "1", *[o for o in overrides(root, "x") if "=" in o and not
            o.startswith(("task.data", "checkpoint.save_dir"))], "optimization.max_update=8"]
    run_script(capsys, monkeypatch, "finetuning/esc50_cv.py", root, *args)
    summary = json.loads((tmp_path / "cv" / "esc50_cv.json").read_text())
    assert summary["folds"]["1"]["num_clips"] == 6 and 0 <= summary["mean"] <= 100
    assert (tmp_path / "cv" / "fold1" / "data" / "train.tsv").read_text().count("\n") == 1 + 24
    assert "| 1 | 6 |" in (tmp_path / "cv" / "esc50_cv.md").read_text()
    out = run_script(capsys, monkeypatch, "finetuning/esc50_cv.py", root, *args)
    assert "fold 1: done earlier" in out
