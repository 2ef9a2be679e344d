"""The fault suite: kills, full disks, bad files and new users' slips lose nothing.

A kill or a full disk never stops "run it again to resume", a one-clip batch never kills a run,
skipped files can't fake training, no loader runs pickled code, and a new user's slips get a clear
answer.

Faults are injected into tiny runs on the generated tone set: SIGKILL in the middle of a checkpoint
write (``tests/slow_save.py`` stalls it), truncated and zero-byte ``checkpoint_last.pt``, a file
size limit (``ulimit -f``, as a full disk: EFBIG), a wrong manifest root, truncated audio, one-clip
batches, pickle payloads and text files given to every loader."""
import errno
import glob
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from mam_clap_plugin.data.audio import AudioError
from mam_clap_plugin.data.dataset import MamClapDataset, is_skipped_batch
from mam_clap_plugin.data.manifest import read_manifest, write_manifest
from mam_clap_plugin.data.target_store import TargetStoreHeader
from mam_clap_plugin.files import CheckpointError, fairseq_checkpoint_globals, file_sha256, read_torch_file
from mam_clap_plugin.hydra_runs import hydra_train_executable, parse_json_log, plugin_dir, run_hydra_train

from .conftest import CONFIG_DIR, REPO, load_script
from .helpers import free_port, wait_all

FT_CONFIG_DIR = os.path.join(REPO, "examples", "finetuning", "config")
SLOW_SAVE = os.path.join(REPO, "tests", "slow_save.py")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 shared cores: one thread per process

#: Tiny, fast settings: 12 training clips in batches of 4 = 3 updates per epoch, a checkpoint every 2.
PRETRAIN = [
    "+size=tiny", "task.target_length=64", "common.cpu=true", "common.log_interval=1", "dataset.batch_size=4",
    "dataset.num_workers=0", "optimization.update_freq=[1]", "optimization.lr=[0.002]",
    "lr_scheduler.warmup_updates=1", "checkpoint.save_interval_updates=2",
]
FINETUNE = [
    "+size=tiny", "task.target_length=64", "task.timem=16", "common.cpu=true", "common.log_interval=1",
    "dataset.batch_size=4", "dataset.num_workers=0", "optimization.lr=[0.002]", "optimization.max_epoch=0",
    "lr_scheduler.warmup_updates=1", "checkpoint.save_interval_updates=2",
]
SAVE_INTERVAL = 2


def updates(text):
    return [int(r["num_updates"]) for r in parse_json_log(text).get("train_inner", [])]


def saving_at(text) -> int:
    """The update count of the last save the log started."""
    return int(re.findall(r"Preparing to save checkpoint for epoch \d+ @ (\d+) updates", text)[-1])


def last_updates(path) -> int:
    from mam_clap_plugin.tasks.resume import checkpoint_updates

    return checkpoint_updates(str(path))


def ddp(port, rank):
    return ["distributed_training.distributed_world_size=2", "distributed_training.distributed_backend=gloo",
            "distributed_training.ddp_backend=legacy_ddp", "distributed_training.distributed_no_spawn=true",
            f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
            f"distributed_training.distributed_rank={rank}"]


def start(config_dir, name, args, run_dir, log, env=None, script=None):
    """Start ``fairseq-hydra-train`` (or ``script`` with its arguments) in ``run_dir``, output to ``log``."""
    program = [sys.executable, script] if script else [hydra_train_executable()]
    cmd = [*program, "--config-dir", config_dir, "--config-name", name, *args, f"common.user_dir={plugin_dir()}"]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=run_dir, env={**os.environ, **ONE_THREAD, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_at_mark(procs, logs, mark, timeout=300):
    """SIGKILL every process once ``mark`` exists (a checkpoint write stalled half-way); their logs."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(mark):
        failed = [open(log).read()[-3000:] for p, log in zip(procs, logs) if p.poll() is not None]
        assert not failed and time.monotonic() < deadline, f"no stalled save: {failed}"
        time.sleep(0.1)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    return [open(log).read() for log in logs]


# --------------------------------------------------------------------------- 1. kill during a save
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretraining", "finetuning"])
def test_kill_during_checkpoint_save_then_rerun_resumes(tone_set, tmp_path, stage):
    """SIGKILL while checkpoint_last.pt is being written (its second write, at the end of epoch 1):
    the file stays whole, the same command again resumes from it, with at most
    checkpoint.save_interval_updates updates lost, and the killed write's temporary file is removed."""
    config_dir, name, fast = (CONFIG_DIR, "supmam", PRETRAIN) if stage == "pretraining" else \
        (FT_CONFIG_DIR, "esc50", FINETUNE)
    save = tmp_path / "checkpoints"
    args = [*fast, f"task.data={tone_set}", f"checkpoint.save_dir={save}", "optimization.max_update=6"]
    mark = tmp_path / "stalled"
    proc = start(config_dir, name, args, tmp_path, tmp_path / "killed.log", script=SLOW_SAVE,
                 env={"SLOW_SAVE_AT": "2", "SLOW_SAVE_MARK": str(mark)})
    (text,) = kill_at_mark([proc], [tmp_path / "killed.log"], mark)
    killed_at, last = saving_at(text), save / "checkpoint_last.pt"
    assert mark.read_text().startswith(str(last))  # the stalled write was the one into checkpoint_last.pt
    resumable = last_updates(last)  # whole: a torch checkpoint that reads back
    assert 0 < killed_at - resumable <= SAVE_INTERVAL
    assert glob.glob(f"{last}.tmp-*")  # the killed write's temporary file

    again = run_hydra_train(config_dir, name, args, tmp_path / "again", env=ONE_THREAD)
    assert f"Loaded checkpoint {last} (epoch 1 @ {resumable} updates)" in again.text
    assert updates(again.text) == list(range(resumable + 1, 7))
    assert not glob.glob(str(save / "*.tmp*")) and last_updates(last) == 6
    if stage == "finetuning":  # loading the fine-tuned checkpoint does not claim a random encoder
        assert "randomly initialised" not in again.text.split("Loaded checkpoint")[1]


@pytest.mark.slow
def test_kill_during_checkpoint_save_two_processes(tone_set, tmp_path):
    """The same for the 2-process gloo run (both ranks in one directory, as the README's loop):
    rank 0 is killed while writing checkpoint_last.pt, rank 1 with it; both resume."""
    save = tmp_path / "checkpoints"
    args = [*PRETRAIN, "dataset.batch_size=2", f"task.data={tone_set}", f"checkpoint.save_dir={save}",
            "optimization.max_update=6"]
    mark = tmp_path / "stalled"
    port = free_port()
    logs = [tmp_path / f"killed.rank{r}" for r in (0, 1)]
    procs = [start(CONFIG_DIR, "supmam", args + ddp(port, r), tmp_path, logs[r], script=SLOW_SAVE,
                   env={"SLOW_SAVE_AT": "2", "SLOW_SAVE_MARK": str(mark)}) for r in (0, 1)]
    text = kill_at_mark(procs, logs, mark)[0]
    killed_at, last = saving_at(text), save / "checkpoint_last.pt"
    resumable = last_updates(last)
    assert 0 < killed_at - resumable <= SAVE_INTERVAL

    port = free_port()
    logs = [tmp_path / f"again.rank{r}" for r in (0, 1)]
    results = wait_all([start(CONFIG_DIR, "supmam", args + ddp(port, r), tmp_path, logs[r]) for r in (0, 1)], logs)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    # each rank reads checkpoint_last.pt itself; fairseq logs INFO lines on rank 0 only
    assert f"Loaded checkpoint {last} (epoch 1 @ {resumable} updates)" in results[0][1]
    assert updates(results[0][1]) == list(range(resumable + 1, 7))
    assert last_updates(last) == 6 and not glob.glob(str(save / "*.tmp*"))


@pytest.mark.slow
def test_unreadable_checkpoint_last_resumes_from_the_newest_intact_one(tone_set, tmp_path):
    """A truncated, then a zero-byte checkpoint_last.pt (another program's copy, a damaged disk): the
    rerun logs it and resumes from the newest intact checkpoint by update count."""
    save = tmp_path / "checkpoints"
    args = [*PRETRAIN, f"task.data={tone_set}", f"checkpoint.save_dir={save}"]
    run_hydra_train(CONFIG_DIR, "supmam", args + ["optimization.max_update=4"], tmp_path / "r1")
    last = save / "checkpoint_last.pt"
    assert last_updates(last) == 4 and last_updates(save / "checkpoint_2_4.pt") == 4
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    truncated = run_hydra_train(CONFIG_DIR, "supmam", args + ["optimization.max_update=5"], tmp_path / "r2")
    assert re.search(rf"cannot resume from {re.escape(str(last))}: not a readable checkpoint \(\d+ bytes",
                     truncated.text)
    assert re.search(r"resuming from \S+checkpoint_(2_4|best)\.pt \(4 updates\)", truncated.text)
    assert updates(truncated.text) == [5] and last_updates(last) == 5

    last.write_bytes(b"")
    (save / "checkpoint_best.pt").unlink()
    empty = run_hydra_train(CONFIG_DIR, "supmam", args + ["optimization.max_update=6"], tmp_path / "r3")
    assert "not a readable checkpoint (0 bytes" in empty.text
    assert f"resuming from {save / 'checkpoint_2_4.pt'} (4 updates)" in empty.text
    assert updates(empty.text) == [5, 6]

    for path in glob.glob(str(save / "*.pt")):
        os.truncate(path, 100)
    none = run_hydra_train(CONFIG_DIR, "supmam", args + ["optimization.max_update=7"], tmp_path / "r4", check=False)
    assert none.returncode != 0 and "no other intact checkpoint in" in none.text and "Move the file away" in none.text


def test_atomic_write_keeps_the_previous_file_and_names_it(tmp_path, monkeypatch):
    """A full disk (ENOSPC) half-way through the copy onto checkpoint_last.pt, or through torch.save:
    an OSError naming the file and the bytes needed; the previous file unchanged; no temporary file."""
    from mam_clap_plugin.tasks import resume

    resume.install()
    from fairseq import checkpoint_utils

    src, dst = tmp_path / "checkpoint_1_2.pt", tmp_path / "checkpoint_last.pt"
    torch.save({"new": torch.zeros(1000)}, src)
    torch.save({"old": 1}, dst)
    before = dst.read_bytes()

    def full_disk(source, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"PK" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(OSError, match=rf"{re.escape(str(dst))}: checkpoint not written: No space left on device "
                                      rf"\({os.path.getsize(src)} bytes needed, \d+ bytes free in") as err:
        checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert err.value.errno == errno.ENOSPC and "the previous file is unchanged" in str(err.value)
    assert dst.read_bytes() == before and sorted(os.listdir(tmp_path)) == [src.name, dst.name]

    def too_large(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(torch, "save", too_large)
    with pytest.raises(OSError, match=rf"{re.escape(str(dst))}: checkpoint not written: File too large"):
        checkpoint_utils.torch_persistent_save({"x": 1}, str(dst))
    assert dst.read_bytes() == before and sorted(os.listdir(tmp_path)) == [src.name, dst.name]


def test_a_checkpoint_error_while_fairseq_loads_is_not_an_unreadable_checkpoint_last(tmp_path, monkeypatch):
    """The resume check reads checkpoint_last.pt and passes; a CheckpointError that fairseq's own loading
    raises afterwards comes through as it is (no fallback to another checkpoint, no second load)."""
    from types import SimpleNamespace

    from mam_clap_plugin.tasks import resume

    torch.save({"optimizer_history": [{"num_updates": 5}], "model": {}}, tmp_path / "checkpoint_last.pt")
    torch.save({"optimizer_history": [{"num_updates": 3}], "model": {}}, tmp_path / "checkpoint_1_3.pt")
    loads = []

    def fairseq_load(cfg, trainer, **kwargs):
        loads.append(cfg.restore_file)
        raise CheckpointError("raised while loading the model")

    monkeypatch.setitem(resume._ORIGINAL, "load_checkpoint", fairseq_load)
    cfg = OmegaConf.create({"save_dir": str(tmp_path), "restore_file": "checkpoint_last.pt"})
    trainer = SimpleNamespace(cfg=OmegaConf.create({"optimization": {"max_update": 10}}), checkpoint_suffix="",
                              task=SimpleNamespace())
    with pytest.raises(CheckpointError, match="^raised while loading the model$"):
        resume.load_checkpoint(cfg, trainer)
    assert loads == ["checkpoint_last.pt"]


@pytest.mark.slow  # starts a process to get a PID that is surely dead
def test_newest_intact_checkpoint_by_update_count(tmp_path):
    from mam_clap_plugin.tasks.resume import newest_intact_checkpoint, remove_orphans

    def save(name, num_updates):
        torch.save({"optimizer_history": [{"num_updates": num_updates}], "model": {}}, tmp_path / name)

    save("checkpoint_1_10.pt", 10)
    save("checkpoint_best.pt", 15)
    save("checkpoint_2_20.pt", 20)
    save("crash.pt", 99)  # not a name fairseq resumes from
    data = (tmp_path / "checkpoint_2_20.pt").read_bytes()
    (tmp_path / "checkpoint_2_20.pt").write_bytes(data[:200])
    save("checkpoint_last.pt", 25)
    assert newest_intact_checkpoint(str(tmp_path), skip=str(tmp_path / "checkpoint_last.pt")) == (
        str(tmp_path / "checkpoint_best.pt"), 15)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"checkpoint_last.pt.tmp-{int(dead.stdout)}"
    live = tmp_path / f"checkpoint_last.pt.tmp-{os.getpid()}"
    orphan.write_bytes(b"x")
    live.write_bytes(b"x")
    remove_orphans(str(tmp_path))
    assert not orphan.exists() and live.exists()


@pytest.mark.slow
def test_full_disk_while_saving_a_checkpoint(tone_set, tmp_path):
    """A file size limit below the checkpoint's size (EFBIG, as a full disk gives ENOSPC): the run stops
    with an error naming the checkpoint file, and leaves no partial or temporary file."""
    save = tmp_path / "checkpoints"
    args = [*PRETRAIN, f"task.data={tone_set}", f"checkpoint.save_dir={save}", "optimization.max_update=2",
            f"common.user_dir={plugin_dir()}"]
    command = " ".join([hydra_train_executable(), "--config-dir", CONFIG_DIR, "--config-name", "supmam", *args])
    proc = subprocess.run(["bash", "-c", f"ulimit -f 1024 && exec {command}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert proc.returncode != 0
    assert re.search(r"checkpoint\w*\.pt: checkpoint not written: File too large \(\d+ bytes free in",
                     proc.stdout + proc.stderr), proc.stderr[-3000:]
    assert os.listdir(save) == []
    again = run_hydra_train(CONFIG_DIR, "supmam", args[:-1], tmp_path / "again")  # room again: trains afresh
    assert updates(again.text) == [1, 2] and last_updates(save / "checkpoint_last.pt") == 2


@pytest.mark.slow
def test_full_disk_while_extracting_targets(tone_set, clap_checkpoint, tmp_path):
    """The store's blocks are allocated when it is created: a full disk is an OSError naming the store
    and the bytes it needs (not a SIGBUS later), and no temporary file stays."""
    script = os.path.join(REPO, "examples", "prepare", "extract_clap_targets.py")
    out = tmp_path / "targets"
    command = f"ulimit -f 100 && exec {sys.executable} {script} {tone_set} train --checkpoint {clap_checkpoint} " \
              f"--out {out} --num-workers 0"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.search(rf"error: .*{re.escape(str(out / 'train.tgt'))}: cannot allocate the target store: \d+ bytes "
                     r"needed", proc.stderr)
    assert "Traceback" not in proc.stderr and os.listdir(out) == []


def test_target_store_allocation_failure_names_the_store(tmp_path, monkeypatch):
    from mam_clap_plugin.data import target_store

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    header = TargetStoreHeader(teacher="t", checkpoint_sha256="0" * 64, layer="final", projection=False, grid_freq=2,
                               grid_time=4, dim=8, sample_rate=48000, seconds=10.0,
                               freq_edges_hz=[50.0, 1000.0, 14000.0], num_clips=100)
    path = str(tmp_path / "train.tgt")
    size = 4096 + 4096 + 100 * 2 * 4 * 8 * 2
    with pytest.raises(OSError, match=rf"{re.escape(path)}: cannot allocate the target store: {size} bytes needed"):
        target_store.open_target_store_for_writing(path, header)
    with pytest.raises(OSError, match="No space left on device"):
        target_store.create_target_store(path, header)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- 2. skipped files
def move_root(data, split="train"):
    """Point ``split.tsv``'s root line (line 1) at a directory that does not exist."""
    path = os.path.join(data, f"{split}.tsv")
    lines = open(path).read().splitlines()
    lines[0] = "audio_moved"
    open(path, "w").write("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretraining", "finetuning"])
def test_wrong_root_with_skip_bad_files_stops(tone_set, tmp_path, stage):
    """Every training clip skipped (the manifest's root moved): the run stops at the first update
    with an error naming the count, the first files and the root line; no checkpoint is written."""
    data = shutil.copytree(tone_set, tmp_path / "data")
    move_root(data)
    config_dir, name, fast = (CONFIG_DIR, "supmam", PRETRAIN) if stage == "pretraining" else \
        (FT_CONFIG_DIR, "esc50", FINETUNE)
    args = [*fast, f"task.data={data}", f"checkpoint.save_dir={tmp_path / 'ckpt'}", "optimization.max_update=3",
            "task.skip_bad_files=true"]
    run = run_hydra_train(config_dir, name, args, tmp_path / "r", check=False, env=ONE_THREAD)
    assert run.returncode != 0
    assert "SkippedFilesError: 4 of the 12 clips of this training epoch were skipped as unusable (33.3%, more " \
           "than task.max_skipped_fraction=0.01)" in run.text
    assert re.search(r"first skipped in this process: \S+train\.tsv:\d+: audio_moved/train_\d+\.wav", run.text)
    assert f"the manifest's root directory 'audio_moved' ({data}/train.tsv:1) does not exist" in run.text
    assert not os.path.exists(tmp_path / "ckpt" / "checkpoint_last.pt") and updates(run.text) == []


def tiny_task_and_model(data, variant, **task_fields):
    """In-process pretraining task, tiny SupMAM / SupMAM-CLAP model, criterion and optimizer."""
    from types import SimpleNamespace

    from mam_clap_plugin.criterions.supmam_clap import SupMamClapCriterion, SupMamClapCriterionConfig
    from mam_clap_plugin.models.supmam_clap import SupMamClapConfig
    from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig, MamClapPretrainingTask

    clap = variant == "supmam_clap"
    task = MamClapPretrainingTask.setup_task(MamClapPretrainingConfig(
        data=str(data), labels="lbl", target_store=os.path.join(data, "targets") if clap else None,
        target_length=64, **task_fields))
    cfg = OmegaConf.structured(SupMamClapConfig(
        encoder_embed_dim=32, encoder_layers=1, encoder_attention_heads=4, max_frames=64, mask_ratio=0.5,
        decoder_embed_dim=32, decoder_layers=1, decoder_attention_heads=4, classification_branch=True,
        cls_hidden_dim=16, target="clap" if clap else "pixel"))
    cfg._name = "supmam_clap"
    torch.manual_seed(0)
    model = task.build_model(cfg)
    criterion = SupMamClapCriterion(SupMamClapCriterionConfig(lambda_cls=0.01), task)
    optimizer = SimpleNamespace(backward=lambda loss: loss.backward())  # all FairseqTask.train_step calls
    return task, model, criterion, optimizer


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize("variant", ["supmam", "supmam_clap"])
def test_all_skipped_batch_runs_a_placeholder_counted_and_bounded(tone_set, tmp_path, variant):
    """A batch whose clips were all skipped: the placeholder's forward and backward run (every process
    takes part in the update) with no gradient, no clip, no loss weight and BatchNorm's statistics
    untouched, and the same logging keys as a real batch; the skipped clips are logged and counted,
    and past task.max_skipped_fraction of the epoch the run stops naming them. In validation the
    placeholder's scores stay out of mAP."""
    from fairseq import metrics

    from mam_clap_plugin.tasks.base import SkippedFilesError

    data = shutil.copytree(tone_set, tmp_path / "data")
    for name in ("train_0.wav", "train_1.wav", "train_2.wav", "train_3.wav", "valid_0.wav"):
        os.remove(os.path.join(data, "audio", name))
    for split in ("train", "valid"):  # the copy's manifests still point at the shared set
        lines = open(os.path.join(data, f"{split}.tsv")).read().splitlines()
        open(os.path.join(data, f"{split}.tsv"), "w").write("\n".join([str(data / "audio"), *lines[1:]]) + "\n")
    task, model, criterion, optimizer = tiny_task_and_model(data, variant, skip_bad_files=True,
                                                            max_skipped_fraction=0.5)
    task.load_dataset("train")
    dataset = task.datasets["train"]
    batch = dataset.collater([dataset[i] for i in range(4)])
    assert is_skipped_batch(batch) and batch["num_skipped"] == 4 and batch["id"].tolist() == [-1]
    assert batch["skipped_files"][0] == f"{data / 'train.tsv'}:2: {data / 'audio' / 'train_0.wav'}"
    before = bn_buffers(model)
    task.begin_epoch(1, model)
    loss, sample_size, log = task.train_step(batch, model, criterion, optimizer, 0)
    assert sample_size == 0 and log["nsentences"] == 0 and log["num_skipped"] == 4
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in bn_buffers(model).items())

    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics([log], criterion)
    assert agg["skipped_files"].sum == 4  # 4 of 12 clips: within the bound of 0.5
    good = dataset.collater([dataset[i] for i in range(4, 8)])
    _, size, good_log = task.train_step(good, model, criterion, optimizer, 1)
    assert size == 1 and good_log["nsentences"] == 4 and good_log["num_skipped"] == 0
    # fairseq sums the outputs of all processes key by key: the same keys, the same kinds of value
    assert {k: torch.is_tensor(v) for k, v in log.items()} == {k: torch.is_tensor(v) for k, v in good_log.items()}
    with pytest.raises(SkippedFilesError, match=r"^8 of the 12 clips of this training epoch were skipped as "
                                                r"unusable \(66\.7%.*first skipped in this process: .*train_0\.wav"):
        with metrics.aggregate(new_root=True):
            task.reduce_metrics([good_log, log], criterion)

    task.load_dataset("valid")
    valid = task.datasets["valid"]
    task.begin_valid_epoch(1, model)
    criterion.eval()  # as fairseq's trainer does before valid_step
    with metrics.aggregate(new_root=True) as agg:
        loss, size, vlog = task.valid_step(valid.collater([valid[0]]), model, criterion)
        _, _, real = task.valid_step(valid.collater([valid[1]]), model, criterion)
    assert size == 0 and vlog["num_skipped"] == 1 and vlog["skipped_share"] == pytest.approx(1 / 6)
    assert vlog.keys() == real.keys() and not vlog["loss"] and real["loss"] > 0
    assert agg["mAP"].result.num_clips == 1  # the placeholder's scores are not a clip
    with pytest.raises(SkippedFilesError, match="1 of the 6 clips of this validation pass"):
        task.max_skipped_fraction = 0.1
        with metrics.aggregate(new_root=True):
            task.reduce_metrics([vlog], criterion)


def test_max_skipped_fraction_is_a_fraction(tone_set):
    from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig, MamClapPretrainingTask

    with pytest.raises(ValueError, match=r"task.max_skipped_fraction=1.5 must be in \[0, 1\]"):
        MamClapPretrainingTask.setup_task(MamClapPretrainingConfig(data=tone_set, max_skipped_fraction=1.5))


# --------------------------------------------------------------------------- 5. one-clip batches
@pytest.mark.parametrize("variant", ["supmam", "supmam_clap"])
def test_one_clip_batch_trains(tone_set, variant):
    """BatchNorm in training needs two values per channel: a one-clip batch is normalised with the
    running statistics (left unchanged) and still trains the classification branch."""
    task, model, criterion, optimizer = tiny_task_and_model(tone_set, variant)
    task.load_dataset("train")
    dataset = task.datasets["train"]
    before = bn_buffers(model)
    _, size, log = task.train_step(dataset.collater([dataset[0]]), model, criterion, optimizer, 0)
    assert size == 1 and log["nsentences"] == 1 and math.isfinite(float(log["loss"]))
    assert all(torch.equal(before[k], v) for k, v in bn_buffers(model).items())
    head = model.classifier
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    task.train_step(dataset.collater([dataset[0], dataset[1]]), model, criterion, optimizer, 1)
    tracked = [v for k, v in bn_buffers(model).items() if k.endswith("num_batches_tracked")]
    assert [int(v) for v in tracked] == [1]  # two clips: batch statistics, counted once


def one_clip_batch_args(tone_set, tmp_path, variant, max_update):
    """Overrides for 12 training clips in batches of 11 (the variant's targets from the tone set's store)."""
    args = [*PRETRAIN, f"task.data={tone_set}", f"checkpoint.save_dir={tmp_path / 'ckpt'}", "dataset.batch_size=11",
            f"optimization.max_update={max_update}"]
    if variant == "supmam_clap":
        args.append(f"task.target_store={os.path.join(tone_set, 'targets')}")
    return args


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["supmam", "supmam_clap"])
def test_one_clip_batch_trains_through_fairseq(tone_set, tmp_path, variant):
    """12 clips in batches of 11: every epoch's second batch holds one clip."""
    args = one_clip_batch_args(tone_set, tmp_path, variant, max_update=4)
    run = run_hydra_train(CONFIG_DIR, variant, args, tmp_path / "r", env=ONE_THREAD)
    records = parse_json_log(run.text)["train_inner"]
    assert sorted(r["nsentences"] for r in records) == [1, 1, 11, 11]
    assert all(math.isfinite(r["loss"]) and "loss_cls" in r for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["supmam", "supmam_clap"])
def test_one_clip_batch_trains_two_processes(tone_set, tmp_path, variant):
    """2 gloo processes, batches of 11 of 12 clips: in every update one process has a one-clip batch."""
    args = one_clip_batch_args(tone_set, tmp_path, variant, max_update=2)
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    results = wait_all([start(CONFIG_DIR, variant, args + ddp(port, r), tmp_path, logs[r]) for r in (0, 1)], logs)
    for rc, text in results:
        assert rc == 0, text[-3000:]
    records = parse_json_log(results[0][1])["train_inner"]
    assert [r["nsentences"] for r in records] == [12, 12] and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_skipped_clips_on_one_process_of_two(tone_set, tmp_path):
    """2 gloo processes, one clip per batch, 3 of 12 training clips and 1 of 6 validation clips
    missing: some updates see a placeholder on one process and a clip on the other. Training
    goes on (within task.max_skipped_fraction=0.5) and every skipped clip is logged."""
    data = shutil.copytree(tone_set, tmp_path / "data", ignore=shutil.ignore_patterns("targets"))
    for name in ("train_1.wav", "train_6.wav", "train_10.wav", "valid_2.wav"):
        os.remove(data / "audio" / name)
    for split in ("train", "valid"):
        lines = (data / f"{split}.tsv").read_text().splitlines()
        (data / f"{split}.tsv").write_text("\n".join([str(data / "audio"), *lines[1:]]) + "\n")
    args = [*PRETRAIN, f"task.data={data}", f"checkpoint.save_dir={tmp_path / 'ckpt'}", "dataset.batch_size=1",
            "optimization.max_update=6", "task.skip_bad_files=true", "task.max_skipped_fraction=0.5"]
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    results = wait_all([start(CONFIG_DIR, "supmam", args + ddp(port, r), tmp_path, logs[r]) for r in (0, 1)], logs)
    for rc, text in results:
        assert rc == 0, text[-3000:]
    run = parse_json_log(results[0][1])
    records = run["train_inner"]
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    assert sum(r.get("skipped_files", 0) for r in records) == 3 and sum(r["nsentences"] for r in records) == 9
    assert run["valid"][-1]["valid_skipped_files"] == 1


# --------------------------------------------------------------------------- 3, 4. loaders
class Payload:
    """Unpickling this runs ``touch MARKER`` (through os.system)."""

    marker = ""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def loaders():
    """Every loader a user gives a file to: (name, call)."""
    from mam_clap_plugin.checkpoint import load_encoder
    from mam_clap_plugin.convert import read_state_dict
    from mam_clap_plugin.inference import load_classifier
    from mam_clap_plugin.models.mam_clap_classifier import MamClapClassifier, MamClapClassifierConfig
    from mam_clap_plugin.optim.adopt_adam import adopt_adam_checkpoint
    from mam_clap_plugin.teacher import load_clap_teacher
    from upstream.expert import UpstreamExpert

    return {
        "load_encoder": load_encoder,
        "upstream -k": UpstreamExpert,
        "model.model_path": lambda p: MamClapClassifier.build_model(
            OmegaConf.structured(MamClapClassifierConfig(model_path=p, num_classes=3)), None),
        "teacher --checkpoint": load_clap_teacher,
        "predict.py / evaluate.py": load_classifier,
        "audiomae_to_mam_clap.py": read_state_dict,
        "adopt_adam": adopt_adam_checkpoint,
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.txt").write_text("hello, not a checkpoint\n")
    (root / "empty.pt").write_bytes(b"")
    torch.save({"model": {"w": torch.zeros(1000)}}, root / "whole.pt")
    (root / "cut.pt").write_bytes((root / "whole.pt").read_bytes()[:600])
    (root / "folder.pt").mkdir()
    Payload.marker = str(root / "PWNED")
    torch.save({"model": Payload(), "state_dict": Payload(), "optimizer_history": Payload()}, root / "payload.pt")
    return root


@pytest.mark.parametrize("name", ["notes.txt", "empty.pt", "cut.pt", "folder.pt"])
@pytest.mark.parametrize("loader", list(loaders()))
def test_unreadable_file_is_named_by_every_loader(bad_files, name, loader):
    path = str(bad_files / name)
    with pytest.raises(CheckpointError, match=re.escape(path)) as err:
        loaders()[loader](path)
    # a folder is read as a Hugging Face folder by the encoder loaders (config.json + model.safetensors)
    folder = ("config.json: not found" if loader in ("load_encoder", "upstream -k", "model.model_path",
                                                   "predict.py / evaluate.py") else "is a directory")
    why = {"notes.txt": "neither a torch zip archive nor a pickle", "empty.pt": "empty (0 bytes)",
           "cut.pt": "damaged or truncated torch archive of 600 bytes", "folder.pt": folder}[name]
    assert why in str(err.value)


@pytest.mark.parametrize("loader", list(loaders()))
def test_pickle_payload_runs_in_no_loader(bad_files, loader):
    with pytest.raises(CheckpointError, match=r"payload\.pt: holds pickled objects that torch's weights-only loader "
                                              r"refuses \(the global\(s\) posix\.system\).*If you trust this file"):
        loaders()[loader](str(bad_files / "payload.pt"))
    assert not (bad_files / "PWNED").exists()


def test_pickle_payload_in_checkpoint_last_runs_nothing(bad_files):
    """The resume check reads checkpoint_last.pt weights-only too: it leaves a refused file to
    fairseq's own (weights-only) load, which refuses it."""
    from mam_clap_plugin.tasks.resume import checkpoint_updates

    assert checkpoint_updates(str(bad_files / "payload.pt")) is None
    assert not (bad_files / "PWNED").exists()


def fairseq_adam_checkpoint(path, **extra):
    torch.save({"optimizer_history": [{"optimizer_name": "FairseqAdam", "num_updates": 3}],
                "last_optimizer_state": {"state": {}, "param_groups": []}, "model": {}, **extra}, path)


def test_adopt_adam_weights_only_trusted_and_twice(bad_files, tmp_path, capsys):
    import argparse

    from mam_clap_plugin.optim import adopt_adam

    path = str(tmp_path / "checkpoint_last.pt")
    fairseq_adam_checkpoint(path, args=argparse.Namespace(arch="old"))  # an older fairseq's args: allowed
    assert adopt_adam.main([path]) == 0
    assert "relabelled for mam_clap_adamw (original kept as" in capsys.readouterr().out
    assert read_torch_file(path, safe_globals=fairseq_checkpoint_globals())["optimizer_history"][-1][
        "optimizer_name"] == "MamClapAdamW"
    assert adopt_adam.main([path]) == 0  # again: one line, nothing to do
    assert capsys.readouterr().out == f"{path}: already relabelled for mam_clap_adamw (MamClapAdamW); nothing to do\n"

    assert adopt_adam.main([str(bad_files / "payload.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad_files / 'payload.pt'}: holds pickled objects that torch's weights-only "
                          "loader refuses (the global(s) posix.system)")
    assert "--trusted" in err and "Traceback" not in err
    assert not (bad_files / "PWNED").exists()
    custom = str(tmp_path / "custom.pt")
    fairseq_adam_checkpoint(custom, extra=Unlisted())
    assert adopt_adam.main([custom]) == 1 and "tests.test_faults.Unlisted" in capsys.readouterr().err
    assert adopt_adam.main(["--trusted", custom]) == 0  # the user vouches for it


class Unlisted:
    """A class outside the allow-list (harmless): loads only with --trusted."""


@pytest.mark.slow
def test_fairseq_checkpoints_need_no_globals_beyond_the_allow_list(pretraining_checkpoint):
    """A real checkpoint of fairseq-hydra-train: every global it pickles is one weights-only loading allows."""
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(pretraining_checkpoint)
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in fairseq_checkpoint_globals()}
    assert set(unsafe) <= allowed, unsafe
    state = read_torch_file(pretraining_checkpoint)  # weights-only, nothing added
    assert state["optimizer_history"][-1]["optimizer_name"] == "MamClapAdamW"


# --------------------------------------------------------------------------- 4. bad audio
def write_clip(path, seconds, rate=16000):
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(int(seconds * rate))).astype(np.float32), rate)


def test_truncated_audio_is_a_bad_file(tmp_path):
    """Fewer samples than the manifest says: within 1% or 0.1 s fine; beyond, a bad file (an error
    naming it, or skipped and counted with task.skip_bad_files)."""
    write_clip(tmp_path / "short.wav", 0.5)
    write_clip(tmp_path / "close.wav", 0.95)
    write_manifest(str(tmp_path / "train.tsv"), str(tmp_path), ["short.wav", "close.wav"], [16000, 16000])
    manifest = read_manifest(str(tmp_path / "train.tsv"))
    strict = MamClapDataset(manifest, target_length=64)
    with pytest.raises(AudioError, match=r"train\.tsv:2: \S+short\.wav: truncated audio: 8000 samples, but the "
                                         r"manifest says 16000 \(8000 missing\)"):
        strict[0]
    assert strict[1]["source"].shape == (64, 128)  # 800 samples short: within 0.1 s
    data = (tmp_path / "close.wav").read_bytes()
    (tmp_path / "close.wav").write_bytes(data[: len(data) // 2])  # a cut download: the header still says 15200
    lenient = MamClapDataset(manifest, target_length=64, skip_bad_files=True)
    assert "truncated audio: 7" in lenient[1]["skipped"]
    batch = lenient.collater([lenient[0], lenient[1]])
    assert is_skipped_batch(batch) and batch["num_skipped"] == 2


def test_missing_manifest_root_names_line_1(tmp_path):
    write_manifest(str(tmp_path / "train.tsv"), "relative/audio", ["a.wav"], [16000])
    dataset = MamClapDataset(read_manifest(str(tmp_path / "train.tsv")), target_length=64)
    with pytest.raises(AudioError, match=re.escape(f"the manifest's root directory 'relative/audio' "
                                                   f"({tmp_path / 'train.tsv'}:1) does not exist")):
        dataset[0]


# --------------------------------------------------------------------------- 6. a new user's slips
def test_labels_for_a_valid_split_missing_a_class(tmp_path, capsys):
    """labels.py on valid after train: train's classes.txt is used; a class with no valid clip is a warning."""
    labels = load_script("examples/prepare/labels.py")
    for split, words in (("train", ["yes/a.wav", "no/b.wav", "up/c.wav"]), ("valid", ["no/d.wav", "yes/e.wav"])):
        write_manifest(str(tmp_path / f"{split}.tsv"), str(tmp_path), words, [16000] * len(words))
    out = tmp_path / "manifests"
    labels.main(["speech_commands", str(tmp_path / "train.tsv"), "--out-dir", str(out)])
    labels.main(["speech_commands", str(tmp_path / "valid.tsv"), "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'valid.tsv'}: no clips of 1 of the 3 classes: up" in err
    assert (out / "classes.txt").read_text() == "no\nup\nyes\n" and (out / "valid.lbl").read_text() == "0\n2\n"
    write_manifest(str(tmp_path / "test.tsv"), str(tmp_path), ["left/f.wav"], [16000])
    with pytest.raises(SystemExit, match=r"classes.txt already exists with different classes: 3, without the "
                                         r"folder\(s\) \['left'\]"):
        labels.main(["speech_commands", str(tmp_path / "test.tsv"), "--out-dir", str(out)])


def test_warmup_longer_than_the_run_warns(caplog):
    from mam_clap_plugin.tasks.resume import warn_short_warmup

    cfg = OmegaConf.create({"lr_scheduler": {"warmup_updates": 45000}, "optimization": {"max_update": 20,
                                                                                        "lr": [0.0002]}})
    with caplog.at_level(logging.WARNING):
        warn_short_warmup(cfg)
    assert "lr_scheduler.warmup_updates=45000 >= optimization.max_update=20: the lr never leaves its warmup" in \
        caplog.text
    caplog.clear()
    cfg.lr_scheduler.warmup_updates = 2
    warn_short_warmup(cfg)
    cfg.lr_scheduler = None  # a scheduler without warmup
    warn_short_warmup(cfg)
    assert caplog.text == ""


def test_encoder_of_a_loaded_checkpoint_is_not_called_random(tone_set, caplog):
    """The fine-tuning task says "randomly initialised" only when it builds a new model without
    model.model_path, not when fairseq rebuilds a checkpoint's model (evaluate.py, predict.py, esc50_cv.py)."""
    from mam_clap_plugin.tasks.mam_clap_finetuning import MamClapFinetuningConfig, MamClapFinetuningTask

    model = OmegaConf.create({"_name": "mam_clap_classifier", "encoder_embed_dim": 32, "encoder_layers": 1,
                              "encoder_attention_heads": 4, "max_frames": 64})
    cfg = OmegaConf.structured(MamClapFinetuningConfig(data=tone_set, target_length=64, train_subset="train", seed=1))
    with caplog.at_level(logging.INFO):
        MamClapFinetuningTask.setup_task(cfg).build_model(model.copy(), from_checkpoint=True)
    assert "randomly initialised" not in caplog.text
    with caplog.at_level(logging.INFO):
        MamClapFinetuningTask.setup_task(cfg).build_model(model.copy())
    assert "encoder randomly initialised (model.model_path unset)" in caplog.text


@pytest.mark.slow
def test_resume_with_another_teachers_targets_is_refused(tone_set, clap_checkpoint, tmp_path):
    """A run trained on the tone set's stores (another teacher, another target width) resumed with the
    online teacher: refused before the model loads, naming what differs (not a shape mismatch)."""
    save = tmp_path / "ckpt"
    args = [*PRETRAIN, f"task.data={tone_set}", f"checkpoint.save_dir={save}", "dataset.batch_size=6"]
    run_hydra_train(CONFIG_DIR, "supmam_clap", args + [f"task.target_store={tone_set}/targets",
                                                       "optimization.max_update=2"], tmp_path / "r1")
    online = [f"task.teacher_checkpoint={clap_checkpoint}", "optimization.max_update=3"]
    refused = run_hydra_train(CONFIG_DIR, "supmam_clap", args + online, tmp_path / "r2", check=False)
    assert refused.returncode != 0
    assert "trained on targets of another teacher: teacher 'random-test-teacher' (store) vs 'laion-clap" in refused.text
    assert "checkpoint_sha256 '0000" in refused.text and "task.allow_target_source_change=true" in refused.text
    assert "size mismatch" not in refused.text


def test_target_source_recorded_and_checked(tone_set, clap_checkpoint, caplog):
    """The checkpoint's target source against this run's: another teacher refused unless
    task.allow_target_source_change; the same teacher through a store or online resumes, saying so."""
    from mam_clap_plugin.data.target_store import TargetStoreError
    from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig, MamClapPretrainingTask

    def task(**kw):
        return MamClapPretrainingTask.setup_task(MamClapPretrainingConfig(data=tone_set, target_length=64, **kw))

    stored = task(target_store=os.path.join(tone_set, "targets")).get_checkpoint_dict()["MamClapPretrainingTask"]
    assert stored["target_source"] == {"kind": "store", "teacher": "random-test-teacher",
                                       "checkpoint_sha256": "0" * 64, "layer": "final", "projection": False}
    online = task(teacher_checkpoint=clap_checkpoint)
    source = online.get_checkpoint_dict()["MamClapPretrainingTask"]["target_source"]
    assert source == {"kind": "online", "teacher": online.teacher.name, "layer": "final", "projection": False,
                      "checkpoint_sha256": file_sha256(clap_checkpoint)}
    with pytest.raises(TargetStoreError, match=r"teacher 'random-test-teacher' \(store\) vs 'laion-clap"):
        online.set_checkpoint_dict(stored)
    with caplog.at_level(logging.INFO):
        task(teacher_checkpoint=clap_checkpoint, allow_target_source_change=True).set_checkpoint_dict(stored)
        assert "resuming with targets of another teacher (teacher, checkpoint_sha256 differ" in caplog.text
        caplog.clear()
        online.set_checkpoint_dict({"target_source": {**source, "kind": "store"}})  # its store, now online
        assert "resuming with the same teacher's targets, now from the online teacher (the checkpoint's came " \
               "from a target store)" in caplog.text
        caplog.clear()
        online.set_checkpoint_dict({"target_source": source})  # the same source: nothing to say
        assert caplog.text == ""


def write_archive(root, words):
    """A miniature Speech Commands archive: one clip per word, the official lists, background noise."""
    for w in words:
        os.makedirs(os.path.join(root, w))
        write_clip(os.path.join(root, w, "spk_nohash_0.wav"), 0.1)
    open(os.path.join(root, "validation_list.txt"), "w").write("")
    open(os.path.join(root, "testing_list.txt"), "w").write("")
    os.makedirs(os.path.join(root, "_background_noise_"))
    write_clip(os.path.join(root, "_background_noise_", "white.wav"), 2.0)


def test_partial_speech_commands_is_refused_unless_allowed(tmp_path, capsys):
    converter = load_script("examples/prepare/speech_commands.py")
    write_archive(tmp_path / "v2", ["yes", "no", "up", "down", "left"])
    assert converter.main([str(tmp_path / "v2"), str(tmp_path / "out"), "--version", "2"]) == 1
    err = capsys.readouterr().err
    assert "5 word folders; Speech Commands v0.02 has 35, and 30 of them are missing: backward, bed," in err
    assert "--allow-partial" in err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="no clips for the valid split"):  # allowed: it goes on (and finds no valid)
        converter.convert(str(tmp_path / "v2"), str(tmp_path / "out"), 2, allow_partial=True)
    assert "warning:" in capsys.readouterr().err
    spc1 = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "bed"]
    write_archive(tmp_path / "v1", spc1)
    assert converter.main([str(tmp_path / "v1"), str(tmp_path / "out1"), "--version", "1"]) == 1
    assert "without --test-root: the test split would be testing_list.txt's files, which have no _silence_" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_scripts_print_no_import_noise():
    for script in ("examples/predict.py", "examples/finetuning/evaluate.py"):
        proc = subprocess.run([sys.executable, os.path.join(REPO, script), "--help"], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:")
        assert "FutureWarning" not in proc.stderr and "tensorboardX" not in proc.stderr, proc.stderr


def test_run_downstream_says_accuracy_is_a_fraction(monkeypatch, capsys):
    from upstream import run_downstream

    class FakeRunner:
        @staticmethod
        def get_downstream_args():
            return None, {}, None

        @staticmethod
        def main():
            print("test acc: 0.9735")

    monkeypatch.setattr(run_downstream, "prepare", lambda: FakeRunner)
    monkeypatch.setattr(run_downstream, "check_downstream", lambda args, config: None)
    monkeypatch.setattr(sys, "argv", ["run_downstream.py", "-m", "evaluate", "-e", "x.ckpt", "--device", "cpu"])
    run_downstream.main()
    out = capsys.readouterr()
    assert out.out == "test acc: 0.9735\n"
    assert "s3prl prints accuracy as a fraction of 1: 0.9735 there is 97.35 %" in out.err
    assert "test acc:" not in out.err  # compare_upstreams.py reads s3prl's own "test acc:" lines
