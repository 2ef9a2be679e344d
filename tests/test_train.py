"""Integration: the four paper configs train through `fairseq-hydra-train` (tiny size,
generated data), resume reproduces an uninterrupted run, 2 CPU processes train, and bad
input stops the run with an error that names the file."""
import math
import os
import socket
import subprocess
import sys

import pytest

from mam_clap_plugin.checkpoint import load_checkpoint, load_encoder, model_config
from mam_clap_plugin.hydra_runs import hydra_train_executable, parse_json_log, plugin_dir, run_hydra_train

from .conftest import CONFIG_DIR, TEACHER_DIM

VARIANTS = ["mam", "mam_clap", "supmam", "supmam_clap"]


def overrides(data, variant, save_dir, *extra):
    """Tiny, fast settings on top of a paper config."""
    out = [
        "+size=tiny",
        f"task.data={data}",
        "task.target_length=64",
        "common.cpu=true",
        "common.log_interval=1",
        "dataset.batch_size=6",
        "dataset.num_workers=0",
        "optimization.update_freq=[1]",
        "optimization.lr=[0.002]",
        "lr_scheduler.warmup_updates=1",
        "checkpoint.save_interval_updates=0",
        f"checkpoint.save_dir={save_dir}",
    ]
    if "clap" in variant:
        out.append(f"task.target_store={os.path.join(data, 'targets')}")
    return out + list(extra)


@pytest.mark.parametrize("variant", VARIANTS)
def test_paper_config_trains(tone_set, tmp_path, variant):
    run = run_hydra_train(
        CONFIG_DIR, variant, overrides(tone_set, variant, tmp_path / "ckpt", "optimization.max_update=12"), tmp_path
    )
    losses = run.losses()
    assert len(losses) == 12
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    first = run.records["train_inner"][0]
    if "clap" in variant:
        assert "loss_vis" in first and "loss_mask" in first and "loss_rec" not in first
    else:
        assert "loss_rec" in first and "loss_vis" not in first
    assert ("loss_cls" in first) == variant.startswith("supmam")
    valid = run.records["valid"][-1]
    if variant.startswith("supmam"):
        assert 0 <= valid["valid_accuracy"] <= 100 and 0 <= valid["valid_mAP"] <= 100
    # the saved config is self-contained: the encoder reloads weights-only, without fairseq's trainer
    encoder = load_encoder(str(tmp_path / "ckpt" / "checkpoint_last.pt"))
    assert encoder.embed_dim == 64 and len(encoder.blocks) == 2
    saved = model_config(load_checkpoint(str(tmp_path / "ckpt" / "checkpoint_last.pt")))
    assert saved["num_classes"] == (3 if variant.startswith("supmam") else 0)
    assert saved["target_dim"] == (TEACHER_DIM if "clap" in variant else 0)


def test_resume_follows_uninterrupted_run(tone_set, tmp_path):
    """Stop after epoch 1 (2 updates), resume to 8 updates: same losses as a straight run."""
    common = ["optimization.max_update=8"]
    straight = run_hydra_train(CONFIG_DIR, "supmam", overrides(tone_set, "supmam", tmp_path / "a", *common), tmp_path / "ra")
    first = run_hydra_train(
        CONFIG_DIR, "supmam", overrides(tone_set, "supmam", tmp_path / "b", *common, "optimization.max_epoch=1"),
        tmp_path / "rb1",
    )
    resumed = run_hydra_train(CONFIG_DIR, "supmam", overrides(tone_set, "supmam", tmp_path / "b", *common), tmp_path / "rb2")
    assert "loaded checkpoint" in resumed.text.lower()
    n_first = len(first.losses())
    assert 0 < n_first < 8
    records = {int(r["num_updates"]): r for r in straight.records["train_inner"]}
    for r in resumed.records["train_inner"]:
        ref = records[int(r["num_updates"])]
        for key in ("loss", "loss_rec", "loss_cls", "lr"):
            assert r[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-4), (key, r, ref)
    assert first.losses() + resumed.losses() == pytest.approx(straight.losses(), abs=1e-4)


def test_two_process_cpu_run(tone_set, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = [
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.ddp_backend=legacy_ddp",
        f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
        "distributed_training.distributed_no_spawn=true",
        "optimization.max_update=4",
        "dataset.batch_size=3",
    ]
    procs = []
    for rank in (0, 1):
        run_dir = tmp_path / f"rank{rank}"
        run_dir.mkdir()
        cmd = [hydra_train_executable(), "--config-dir", CONFIG_DIR, "--config-name", "supmam_clap",
               *overrides(tone_set, "supmam_clap", tmp_path / "ckpt", *ddp),
               f"distributed_training.distributed_rank={rank}", f"common.user_dir={plugin_dir()}",
               f"hydra.run.dir={run_dir}"]
        procs.append(subprocess.Popen(cmd, cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "distributed init (rank 1)" in outs[1]

    records = parse_json_log(outs[0])["train_inner"]
    assert len(records) == 4
    # each update sees both ranks' batches: 2 x 3 clips
    assert all(r["nsentences"] == 6 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert os.path.isfile(tmp_path / "ckpt" / "checkpoint_last.pt")


def _copy_set(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_audio_stops_with_file_and_line(tone_set, tmp_path):
    data = _copy_set(tone_set, tmp_path / "data")
    os.remove(os.path.join(data, "audio", "train_3.wav"))
    # the manifest root still points at the shared set: rewrite it to the copy
    for split in ("train", "valid"):
        path = os.path.join(data, f"{split}.tsv")
        lines = open(path).read().splitlines()
        lines[0] = os.path.join(data, "audio")
        open(path, "w").write("\n".join(lines) + "\n")
    run = run_hydra_train(CONFIG_DIR, "supmam", overrides(data, "supmam", tmp_path / "ckpt", "optimization.max_update=4"),
                          tmp_path / "r1", check=False)
    assert run.returncode != 0
    assert "train_3.wav" in run.text and "train.tsv:5" in run.text

    skipped = run_hydra_train(
        CONFIG_DIR, "supmam",
        overrides(data, "supmam", tmp_path / "ckpt2", "optimization.max_update=4", "task.skip_bad_files=true"),
        tmp_path / "r2",
    )
    assert sum(r.get("skipped_files", 0) for r in skipped.records["train_inner"]) >= 1
    assert len(skipped.losses()) == 4


def test_label_file_of_wrong_length_is_refused(tone_set, tmp_path):
    data = _copy_set(tone_set, tmp_path / "data")
    path = os.path.join(data, "valid.lbl")
    open(path, "w").write("".join(open(path).readlines()[:-1]))
    run = run_hydra_train(CONFIG_DIR, "supmam", overrides(data, "supmam", tmp_path / "ckpt", "optimization.max_update=1"),
                          tmp_path / "r", check=False)
    assert run.returncode != 0
    assert "valid.lbl" in run.text


@pytest.fixture(scope="module")
def extracted_targets(tone_set, clap_checkpoint, tmp_path_factory):
    """Stores extracted from the small CLAP teacher with the real extraction script."""
    out = tmp_path_factory.mktemp("extracted")
    script = os.path.join(os.path.dirname(CONFIG_DIR), "..", "prepare", "extract_clap_targets.py")
    for split in ("train", "valid"):
        subprocess.run([sys.executable, script, tone_set, split, "--checkpoint", clap_checkpoint, "--out", str(out),
                        "--num-workers", "0"], check=True, capture_output=True)
    return str(out)


@pytest.mark.parametrize("variant", ["mam_clap", "supmam_clap"])
def test_clap_variants_offline_and_online_teacher(tone_set, clap_checkpoint, extracted_targets, tmp_path, variant):
    """Same seed, same teacher: the offline store and the online teacher give the same
    training run (up to the store's fp16 rounding); the teacher is not saved."""
    common = ["optimization.max_update=3", "dataset.batch_size=4"]
    base = [o for o in overrides(tone_set, "mam", tmp_path / "x") if not o.startswith("checkpoint.save_dir")]
    offline = run_hydra_train(CONFIG_DIR, variant, base + common + [
        f"task.target_store={extracted_targets}", f"task.teacher_checkpoint={clap_checkpoint}",
        f"checkpoint.save_dir={tmp_path / 'off'}"], tmp_path / "r_off")
    online = run_hydra_train(CONFIG_DIR, variant, base + common + [
        f"task.teacher_checkpoint={clap_checkpoint}", f"checkpoint.save_dir={tmp_path / 'on'}"], tmp_path / "r_on")
    assert "online teacher laion-clap" in online.text
    assert len(offline.losses()) == len(online.losses()) == 3
    assert online.losses() == pytest.approx(offline.losses(), rel=2e-3)
    first = online.records["train_inner"][0]
    assert "loss_vis" in first and "loss_mask" in first
    assert ("loss_cls" in first) == (variant == "supmam_clap")
    state = load_checkpoint(str(tmp_path / "on" / "checkpoint_last.pt"))
    assert not [k for k in state["model"] if "teacher" in k or "audio_branch" in k or "layers." in k]
    assert model_config(state)["target_dim"] == 128
    assert load_encoder(str(tmp_path / "on" / "checkpoint_last.pt")).embed_dim == 64
