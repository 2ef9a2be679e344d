"""Pretraining runs through `fairseq-hydra-train`: the README's commands, resume, 2 processes, errors.

The README's pretraining commands run verbatim (tiny size, generated data, a scratch working
directory with relative paths), and the same command again resumes; the four paper configs
train; resume reproduces an uninterrupted run; the README's 2-process command trains and
resumes; a sweep keeps its jobs apart; a trained checkpoint loads the fairseq way without its
data; bad input stops the run with an error that names the file."""
import glob
import math
import os
import shutil
import subprocess
import sys

import pytest

from mam_clap_plugin.checkpoint import load_checkpoint, load_encoder, model_config
from mam_clap_plugin.hydra_runs import hydra_train_executable, parse_json_log, plugin_dir, run_hydra_train

from . import readme
from .conftest import CONFIG_DIR, REPO, TEACHER_DIM
from .helpers import free_port, wait_all

pytestmark = pytest.mark.slow  # every test trains through fairseq-hydra-train

VARIANTS = ["mam", "mam_clap", "supmam", "supmam_clap"]

#: Speed settings a test adds after a README command (tiny model, short clips, small batches).
FAST = [
    "+size=tiny",
    "task.target_length=64",
    "common.cpu=true",
    "common.log_interval=1",
    "dataset.batch_size=6",
    "dataset.num_workers=0",
    "optimization.update_freq=[1]",
    "optimization.lr=[0.002]",
    "lr_scheduler.warmup_updates=1",
    "checkpoint.save_interval_updates=0",
]

PRETRAINING = readme.commands(readme.section("# Pretraining"))
#: The README's command for each variant (the first one shown), its sweep and its 2-process command.
README_COMMAND = {v: next(c for c in PRETRAINING if readme.config_name(c) == v) for v in VARIANTS}
README_SWEEP = next(c for c in PRETRAINING if c.startswith("fairseq-hydra-train -m "))
README_DDP = next(c for c in PRETRAINING if "distributed_world_size=2" in c)


def overrides(data, variant, save_dir, *extra):
    """Tiny, fast settings on top of a paper config."""
    out = FAST + [f"task.data={data}", f"checkpoint.save_dir={save_dir}"]
    if "clap" in variant:
        out.append(f"task.target_store={os.path.join(data, 'targets')}")
    return out + list(extra)


@pytest.fixture
def scratch(tone_set, tmp_path):
    """A working directory laid out as after the README's data steps in a clone:
    examples/pretraining/config, manifests/ (with labels and classes.txt), clap_targets/."""
    shutil.copytree(CONFIG_DIR, tmp_path / "examples" / "pretraining" / "config")
    shutil.copytree(tone_set, tmp_path / "manifests", ignore=shutil.ignore_patterns("targets"))
    shutil.copytree(os.path.join(tone_set, "targets"), tmp_path / "clap_targets")
    return tmp_path


def shell_env(**extra):
    """The README's shell: the environment's fairseq-hydra-train on PATH and $USER_DIR set."""
    path = os.path.dirname(hydra_train_executable()) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, "USER_DIR": plugin_dir(), **extra}


def with_fast(command, *extra):
    """``command`` verbatim, then ``extra`` and the speed settings that neither sets."""
    keys = readme.override_keys(" ".join([command, *extra]))
    return " ".join([command, *(o for o in FAST if o.split("=")[0].lstrip("+") not in keys), *extra])


def run_readme(command, cwd, *extra, log="run.log"):
    """Run a README command (+ speed settings) through bash in ``cwd``; returns (rc, log text)."""
    with open(os.path.join(cwd, log), "w") as out:
        rc = subprocess.run(["bash", "-c", with_fast(command, *extra)], cwd=cwd, env=shell_env(), stdout=out,
                            stderr=subprocess.STDOUT, timeout=600).returncode
    return rc, open(os.path.join(cwd, log)).read()


def updates(text):
    return [int(r["num_updates"]) for r in parse_json_log(text).get("train_inner", [])]


@pytest.mark.parametrize("variant", VARIANTS)
def test_readme_command_trains_and_resumes(scratch, variant):
    """The README's command, run twice from a scratch directory with its relative paths:
    trains (finite, falling loss), then resumes from checkpoints/<variant>/checkpoint_last.pt."""
    command = README_COMMAND[variant]
    assert "task.data=manifests" in command and "hydra.run.dir" not in command
    rc, text = run_readme(command, scratch, "optimization.max_update=12", log="first.log")
    assert rc == 0, text[-3000:]
    run = parse_json_log(text)
    losses = [r["loss"] for r in run["train_inner"]]
    assert updates(text) == list(range(1, 13))
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    first = run["train_inner"][0]
    if "clap" in variant:
        assert "loss_vis" in first and "loss_mask" in first and "loss_rec" not in first
    else:
        assert "loss_rec" in first and "loss_vis" not in first
    assert ("loss_cls" in first) == variant.startswith("supmam")
    if variant.startswith("supmam"):
        valid = run["valid"][-1]
        assert 0 <= valid["valid_accuracy"] <= 100 and 0 <= valid["valid_mAP"] <= 100
    ckpt = scratch / "checkpoints" / variant / "checkpoint_last.pt"
    assert ckpt.is_file() and not (scratch / "outputs").exists()
    # the saved config is self-contained: the encoder reloads weights-only, without fairseq's trainer
    assert load_encoder(str(ckpt)).embed_dim == 64
    saved = model_config(load_checkpoint(str(ckpt)))
    assert saved["num_classes"] == (3 if variant.startswith("supmam") else 0)
    assert saved["target_dim"] == (TEACHER_DIM if "clap" in variant else 0)

    rc, text = run_readme(command, scratch, "optimization.max_update=14", log="second.log")
    assert rc == 0, text[-3000:]
    assert f"Loaded checkpoint {ckpt} (epoch 7 @ 12 updates)" in text
    assert updates(text) == [13, 14]
    if variant == "supmam_clap":
        check_fairseq_loading_without_data(scratch, str(ckpt))


def check_fairseq_loading_without_data(scratch, ckpt):
    """README "Loading a checkpoint the fairseq way": load_model_ensemble_and_task on a
    checkpoint whose data directory, class list and stores are gone; with arg_overrides the
    task loads data from a new place."""
    import torch
    from fairseq import checkpoint_utils

    from mam_clap_plugin import criterions, models, tasks  # noqa: F401  (the README's imports)

    moved = shutil.move(str(scratch / "manifests"), str(scratch / "elsewhere"))
    shutil.rmtree(scratch / "clap_targets")
    ensemble, cfg, task = checkpoint_utils.load_model_ensemble_and_task([ckpt])
    assert cfg.task.data == "manifests" and type(task).__name__ == "MamClapPretrainingTask"
    model = ensemble[0].eval()
    assert model.classifier is not None and model.cfg.target_dim == TEACHER_DIM
    with torch.no_grad():
        assert model.extract_features(torch.zeros(1, 1, 64, 128))["x"].shape == (1, 1 + 4 * 8, 64)

    _, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides={"data": moved, "target_store": None})
    task.load_dataset("valid")
    assert len(task.datasets["valid"]) == 6 and task.num_classes == 3


def test_resume_follows_uninterrupted_run(tone_set, tmp_path):
    """Stop after epoch 1 (2 updates), resume to 8 updates: same losses as a straight run.
    The interrupted run goes through hydra_runs as a user would: relative task.data, the
    configs' own checkpoint directory, the same call again in the same directory."""
    common = ["optimization.max_update=8"]
    straight = run_hydra_train(CONFIG_DIR, "supmam", overrides(tone_set, "supmam", tmp_path / "a", *common),
                               tmp_path / "ra")
    run_dir = tmp_path / "rb"
    run_dir.mkdir()
    os.symlink(tone_set, run_dir / "data")
    args = FAST + ["task.data=data", *common]
    first = run_hydra_train(CONFIG_DIR, "supmam", args + ["optimization.max_epoch=1"], run_dir)
    assert (run_dir / "checkpoints" / "supmam" / "checkpoint_last.pt").is_file()
    resumed = run_hydra_train(CONFIG_DIR, "supmam", args, run_dir)
    assert f"Loaded checkpoint {run_dir / 'checkpoints' / 'supmam' / 'checkpoint_last.pt'}" in resumed.text
    n_first = len(first.losses())
    assert 0 < n_first < 8
    records = {int(r["num_updates"]): r for r in straight.records["train_inner"]}
    for r in resumed.records["train_inner"]:
        ref = records[int(r["num_updates"])]
        for key in ("loss", "loss_rec", "loss_cls", "lr"):
            assert r[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-4), (key, r, ref)
    assert first.losses() + resumed.losses() == pytest.approx(straight.losses(), abs=1e-4)


def test_readme_sweep_keeps_jobs_apart_and_resumes(scratch):
    """The README's -m sweep: each job its own checkpoints under multirun/<date>/<time>/<n>/,
    data read through the relative task.data; rerun with hydra.sweep.dir resumes every job."""
    rc, text = run_readme(README_SWEEP, scratch, "optimization.max_update=2", log="sweep.log")
    assert rc == 0, text[-3000:]
    (sweep_dir,) = glob.glob(str(scratch / "multirun" / "*" / "*"))
    values = [float(v) for v in README_SWEEP.split("criterion.lambda_cls=")[1].split()[0].split(",")]
    for job, value in enumerate(values):
        state = load_checkpoint(os.path.join(sweep_dir, str(job), "checkpoints", "supmam", "checkpoint_last.pt"))
        assert state["cfg"]["criterion"]["lambda_cls"] == value and state["cfg"]["task"]["data"] == "manifests"
    rel = os.path.relpath(sweep_dir, scratch)
    rc, text = run_readme(README_SWEEP, scratch, "optimization.max_update=3", f"hydra.sweep.dir={rel}",
                          log="sweep2.log")
    assert rc == 0, text[-3000:]
    assert text.count("(epoch 2 @ 2 updates)") == len(values)
    assert len(glob.glob(str(scratch / "multirun" / "*" / "*"))) == 1


def _run_ranks(command, cwd, extra, log):
    """Start the README's per-rank command for ranks 0 and 1 (as its loop does), each
    writing to its own log file (no pipe to fill). A port taken between choosing it and
    rank 0 binding it is retried with another; returns [(returncode, text)] per rank."""
    for _ in range(3):
        env = shell_env(PORT=str(free_port()))
        procs, logs = [], []
        for rank in (0, 1):
            path = os.path.join(cwd, f"{log}.rank{rank}")
            logs.append(path)
            with open(path, "w") as out:
                procs.append(subprocess.Popen(["bash", "-c", with_fast(command, *extra)], cwd=cwd,
                                              env={**env, "r": str(rank)}, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        # a rank that fails (e.g. rank 0 finding the port taken) ends the attempt at once,
        # instead of leaving the other waiting for it
        results = wait_all(procs, logs)
        if not any("address already in use" in text.lower() for _, text in results):
            return results
    return results


def test_readme_two_process_command_trains_and_resumes(scratch):
    """The README's 2-process gloo command, verbatim per rank, both ranks in one directory;
    the same command again resumes on both ranks."""
    assert "hydra.run.dir" not in README_DDP and "task.data=manifests" in README_DDP
    assert "${PORT:-29500}" in README_DDP and "distributed_rank=$r" in README_DDP
    first = _run_ranks(README_DDP, scratch, ["optimization.max_update=2", "dataset.batch_size=3"], "first")
    for rc, text in first:
        assert rc == 0, text[-3000:]
    assert "distributed init (rank 1)" in first[1][1]
    records = parse_json_log(first[0][1])["train_inner"]
    # each update sees both ranks' batches: 2 x 3 clips
    assert [r["nsentences"] for r in records] == [6, 6] and all(math.isfinite(r["loss"]) for r in records)
    ckpt = scratch / "checkpoints" / "supmam_tiny_2proc" / "checkpoint_last.pt"
    assert ckpt.is_file()
    # 2-process validation logs mAP too (the scores of both ranks are gathered by the meter
    # shared with fine-tuning, whose 2-process test checks the values against one process)
    (valid,) = parse_json_log(first[0][1])["valid"]
    labels = [line.strip().split(",") for line in open(scratch / "manifests" / "valid.lbl")]
    num_classes = len(open(scratch / "manifests" / "classes.txt").read().split())
    present = {int(c) for row in labels for c in row}
    assert valid["valid_mAP_classes_left_out"] == num_classes - len(present)
    assert math.isfinite(valid["valid_mAP"]) and math.isfinite(valid["valid_accuracy"])

    again = _run_ranks(README_DDP, scratch, ["optimization.max_update=4", "dataset.batch_size=3"], "second")
    for rc, text in again:
        assert rc == 0, text[-3000:]
    assert "Loaded checkpoint checkpoints/supmam_tiny_2proc/checkpoint_last.pt (epoch 2 @ 2 updates)" in again[0][1]
    assert updates(again[0][1]) == [3, 4]


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
    args = overrides(data, "supmam", tmp_path / "ckpt", "optimization.max_update=4")
    run = run_hydra_train(CONFIG_DIR, "supmam", args, tmp_path / "r1", check=False)
    assert run.returncode != 0
    assert "train_3.wav" in run.text and "train.tsv:5" in run.text

    skipped = run_hydra_train(
        CONFIG_DIR, "supmam",
        overrides(data, "supmam", tmp_path / "ckpt2", "optimization.max_update=4", "task.skip_bad_files=true",
                  "task.max_skipped_fraction=0.1"),  # 1 of the 12 training clips
        tmp_path / "r2",
    )
    assert sum(r.get("skipped_files", 0) for r in skipped.records["train_inner"]) >= 1
    assert len(skipped.losses()) == 4


def test_label_file_of_wrong_length_is_refused(tone_set, tmp_path):
    data = _copy_set(tone_set, tmp_path / "data")
    path = os.path.join(data, "valid.lbl")
    open(path, "w").write("".join(open(path).readlines()[:-1]))
    args = overrides(data, "supmam", tmp_path / "ckpt", "optimization.max_update=1")
    run = run_hydra_train(CONFIG_DIR, "supmam", args, tmp_path / "r", check=False)
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
    # the offline run also names the checkpoint (its sha256 must match the store) but must
    # read the store, never run the teacher: an always-online task would fail here
    assert "online teacher" not in offline.text
    assert len(offline.losses()) == len(online.losses()) == 3
    assert online.losses() == pytest.approx(offline.losses(), rel=2e-3)
    first = online.records["train_inner"][0]
    assert "loss_vis" in first and "loss_mask" in first
    assert ("loss_cls" in first) == (variant == "supmam_clap")
    state = load_checkpoint(str(tmp_path / "on" / "checkpoint_last.pt"))
    assert not [k for k in state["model"] if "teacher" in k or "audio_branch" in k or "layers." in k]
    assert model_config(state)["target_dim"] == 128
    assert load_encoder(str(tmp_path / "on" / "checkpoint_last.pt")).embed_dim == 64
    # fairseq's loader rebuilds the task without loading (or finding) the teacher
    from fairseq import checkpoint_utils

    from mam_clap_plugin import criterions, models, tasks  # noqa: F401

    ensemble, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(tmp_path / "on" / "checkpoint_last.pt")], arg_overrides={"teacher_checkpoint": str(tmp_path / "gone.pt")})
    assert task._teacher is None and ensemble[0].cfg.target_dim == 128


def test_docs_continue_from_audiomae_weights_run_verbatim(tone_set, tmp_path):
    """docs/checkpoints.md "MAM-CLAP from AudioMAE's AS-2M weights": the converter and the
    fairseq-hydra-train command as shown, in a scratch dir holding an AudioMAE-layout
    ``pretrained.pth`` (random, 64 wide, 2 blocks: one head at the converter's D / 64),
    ``manifests/`` and ``clap_targets/``; only tiny-size settings appended. The run starts from the
    converted encoder; the same command again resumes and says that resuming wins."""
    import torch

    from .audiomae import audiomae_encoder, decoder_keys, released

    cmds = readme.command_lines(readme.section("## MAM-CLAP from AudioMAE's AS-2M weights"))
    convert, train = (c for c, _ in cmds)
    assert convert.startswith("python examples/convert/audiomae_to_mam_clap.py ")
    assert train.startswith("fairseq-hydra-train ") and "model.encoder_init=audiomae_as2m.safetensors" in train
    enc = audiomae_encoder(64, 2, seed=5)
    torch.save(released({**enc, **decoder_keys(64)}), tmp_path / "pretrained.pth")
    os.symlink(tone_set, tmp_path / "manifests")
    os.symlink(os.path.join(tone_set, "targets"), tmp_path / "clap_targets")
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")
    proc = subprocess.run(["bash", "-c", convert], cwd=tmp_path, env=shell_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tiny = ["model.encoder_attention_heads=1", "lr_scheduler.warmup_updates=1"]
    rc, text = run_readme(train, tmp_path, *tiny, "optimization.max_update=2")
    assert rc == 0, text[-3000:]
    assert "model.encoder_init: encoder weights from audiomae_as2m.safetensors" in text
    assert updates(text)[-1] == 2
    ckpt = tmp_path / "checkpoints" / "mam_clap_from_audiomae" / "checkpoint_last.pt"
    assert torch.equal(load_checkpoint(str(ckpt))["model"]["encoder.pos_embed"], enc["pos_embed"])
    rc, text = run_readme(train, tmp_path, *tiny, "optimization.max_update=3", log="again.log")
    assert rc == 0, text[-3000:]
    assert "resuming wins over encoder_init" in text and updates(text) == [3]


def test_docs_short_run_and_skip_commands_run_verbatim(scratch):
    """docs/pretraining.md's "Short runs" command and its bad-input skipping example, as shown, in a
    scratch directory (fewer updates appended): each trains and writes its own checkpoint folder;
    with fewer updates than the warmup, the run warns that the lr never leaves the warmup."""
    short = readme.commands(readme.section("## Short runs"))
    skip = [c for c in readme.commands(readme.section("## Resuming, several processes, bad input"))
            if "task.skip_bad_files=true" in c]
    assert len(short) == 1 and len(skip) == 1
    for command, folder in ((short[0], "supmam_short"), (skip[0], "supmam_skip")):
        rc, text = run_readme(command, scratch, "optimization.max_update=3", log=f"{folder}.log")
        assert rc == 0, text[-3000:]
        assert updates(text)[-1] == 3 and (scratch / "checkpoints" / folder / "checkpoint_last.pt").is_file()
        # 3 updates: under the short run's 20 warmup updates (a warning), over the skip example's 2
        assert ("the lr never leaves its warmup ramp" in text) == (folder == "supmam_short")
