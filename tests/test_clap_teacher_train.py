"""A caption teacher trained through fairseq-hydra-train works as a teacher.

A caption teacher trained through fairseq-hydra-train on generated clip-caption pairs (tones with
captions): recall@1 and zero-shot accuracy above chance; its checkpoint read unchanged by
extract_clap_targets.py, by task.teacher_checkpoint (offline and online give the same run) and by
fairseq's loader without the data (the tokenizer travels in the checkpoint); bad input stops the
run with the file named."""
import os
import shutil

import pytest
import torch

from mam_clap_plugin.checkpoint import load_checkpoint, model_config
from mam_clap_plugin.data.audio import load_teacher_audio
from mam_clap_plugin.data.manifest import read_manifest
from mam_clap_plugin.data.target_store import open_target_store
from mam_clap_plugin.files import file_sha256
from mam_clap_plugin.hydra_runs import run_hydra_train
from mam_clap_plugin.metrics import retrieval_metrics
from mam_clap_plugin.teacher import load_teacher

from .conftest import CAPTION_TEACHER_OVERRIDES, CONFIG_DIR, TEACHER_CONFIG_DIR, load_script

pytestmark = pytest.mark.slow

zero_shot = load_script("examples/teacher/zero_shot.py")
extract = load_script("examples/prepare/extract_clap_targets.py")

#: Speed settings of the test teacher runs (CPU, batches of 8 of the 24 training clips).
FAST = [*CAPTION_TEACHER_OVERRIDES, "common.cpu=true", "common.log_interval=5", "dataset.batch_size=8",
        "dataset.num_workers=0", "optimization.lr=[0.002]", "lr_scheduler.warmup_updates=5",
        "checkpoint.save_interval_updates=0", "dataset.validate_interval=1000", "checkpoint.save_interval=1000"]


def copy_set(src, dst) -> str:
    """A private copy of a generated set, its manifests pointing at the copy's audio."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("targets"))
    for split in ("train", "valid"):
        path = os.path.join(dst, f"{split}.tsv")
        lines = open(path).read().splitlines()
        lines[0] = os.path.join(dst, "audio")
        open(path, "w").write("\n".join(lines) + "\n")
    return str(dst)


@pytest.fixture(scope="module")
def trained(caption_set, tmp_path_factory):
    """40 updates of the tiny caption teacher (0.64 s clips) on the tone pairs; returns (run, checkpoint)."""
    root = tmp_path_factory.mktemp("teacher")
    args = [*FAST, f"task.data={caption_set}", "optimization.max_update=40",
            f"checkpoint.save_dir={root / 'checkpoints'}"]
    run = run_hydra_train(TEACHER_CONFIG_DIR, "clap", args, str(root / "run"))
    return run, str(root / "checkpoints" / "checkpoint_last.pt")


def test_recall_and_zero_shot_above_chance(trained, caption_set, tmp_path):
    run, ckpt = trained
    losses = run.losses()
    assert len(losses) == 8 and losses[-1] < losses[0]
    (valid,) = run.records["valid"]
    # 3 distinct captions in the valid split ("the sound of low" ...): chance R@1 is 1/3 both ways
    assert valid["valid_a2t_r1"] > 100 / 3 + 10 and valid["valid_t2a_r1"] > 100 / 3 + 10, valid
    assert valid["valid_mean_recall"] > 50
    report = zero_shot.main([ckpt, caption_set, "valid", "--retrieval", "--json", str(tmp_path / "zs.json"),
                             "--num-workers", "0", "--no-progress"])
    assert report["classification"]["accuracy"] > 100 / 3 + 10, report
    assert report["retrieval"]["recall"]["a2t_r1"] == pytest.approx(valid["valid_a2t_r1"], abs=1e-3)
    assert report["retrieval"]["chance"]["a2t_r1"] == pytest.approx(100 / 3)


def test_checkpoint_through_extraction(trained, caption_set, tmp_path):
    """extract_clap_targets.py reads the checkpoint as it is: the store holds the teacher's final map."""
    _, ckpt = trained
    result = extract.main([caption_set, "valid", "--checkpoint", ckpt, "--out", str(tmp_path / "t"), "--num-workers",
                           "0", "--batch-size", "4"])
    assert result["written"] == 12 and result["pending_in_store"] == 0
    store = open_target_store(str(tmp_path / "t" / "valid.tgt"))
    teacher = load_teacher(ckpt)
    h = store.header
    assert (h.teacher, h.checkpoint_sha256, h.layer, h.projection) == (teacher.name, file_sha256(ckpt), "final", False)
    assert (h.grid_freq, h.grid_time, h.dim, h.sample_rate, h.seconds) == (2, 32, 128, 48000, 0.64)
    assert h.freq_edges_hz == pytest.approx(teacher.freq_edges_hz())
    manifest = read_manifest(os.path.join(caption_set, "valid.tsv"))
    wav = torch.stack([load_teacher_audio(manifest.full_path(i), 48000, teacher.num_samples) for i in (0, 7)])
    with torch.no_grad():
        maps = teacher(wav).numpy()
    for row, i in enumerate((0, 7)):
        torch.testing.assert_close(torch.from_numpy(store[i].astype("float32")), torch.from_numpy(maps[row]),
                                   rtol=2e-3, atol=2e-3)


def test_checkpoint_as_online_and_offline_teacher(trained, caption_set, tmp_path):
    """task.teacher_checkpoint reads it unchanged: SupMAM-CLAP from the online teacher and from its store
    give the same run (the store's fp16 rounding aside)."""
    _, ckpt = trained
    store = tmp_path / "targets"
    for split in ("train", "valid"):
        extract.main([caption_set, split, "--checkpoint", ckpt, "--out", str(store), "--num-workers", "0"])
    common = ["+size=tiny", f"task.data={caption_set}", "task.target_length=64", "common.cpu=true",
              "common.log_interval=1", "dataset.batch_size=6", "dataset.num_workers=0", "optimization.max_update=3",
              "optimization.update_freq=[1]", "optimization.lr=[0.002]", "lr_scheduler.warmup_updates=1",
              "checkpoint.save_interval_updates=0", f"task.teacher_checkpoint={ckpt}"]
    offline = run_hydra_train(CONFIG_DIR, "supmam_clap", common + [
        f"task.target_store={store}", f"checkpoint.save_dir={tmp_path / 'off'}"], str(tmp_path / "r_off"))
    online = run_hydra_train(CONFIG_DIR, "supmam_clap", common + [f"checkpoint.save_dir={tmp_path / 'on'}"],
                             str(tmp_path / "r_on"))
    assert "online teacher caption-clap-htsat-e32-d111-h2.4.8 (final)" in online.text
    assert "online teacher" not in offline.text
    assert online.losses() == pytest.approx(offline.losses(), rel=2e-3) and len(online.losses()) == 3
    assert model_config(load_checkpoint(str(tmp_path / "on" / "checkpoint_last.pt")))["target_dim"] == 128


def test_checkpoint_is_self_contained(trained, caption_set, tmp_path):
    """fairseq's loader rebuilds task and model from the checkpoint alone (task.data pointing nowhere, so
    no spm.model to read); the tokenizer is the checkpoint's and the text tower embeds captions."""
    from fairseq import checkpoint_utils

    from mam_clap_plugin import criterions, models, tasks  # noqa: F401

    _, ckpt = trained
    state = load_checkpoint(ckpt)
    moved = shutil.copy(ckpt, str(tmp_path / "teacher.pt"))
    spm = open(os.path.join(caption_set, "spm.model"), "rb").read()
    [model], cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [moved], arg_overrides={"data": str(tmp_path / "gone")})
    assert type(task).__name__ == "ClapTeacherTask" and cfg.model.vocab_size == state["cfg"]["model"]["vocab_size"]
    assert model.tokenizer.serialized() == spm
    model.eval()
    with torch.no_grad():
        text = model.encode_text(["the sound of low", "the sound of high"]).numpy()
        audio = model.encode_audio(0.1 * torch.randn(2, model.num_samples)).numpy()
    assert text.shape == (2, 64) and retrieval_metrics(audio, text, ["a", "b"]).num_captions == 2


def test_bad_input_stops_the_run_naming_the_file(caption_set, tmp_path):
    data = copy_set(caption_set, tmp_path / "data")
    lines = open(os.path.join(data, "valid.cap")).read().splitlines()
    open(os.path.join(data, "valid.cap"), "w").write("\n".join(lines[:-1]) + "\n")
    args = [*FAST, f"task.data={data}", "optimization.max_update=1", f"checkpoint.save_dir={tmp_path / 'c'}"]
    run = run_hydra_train(TEACHER_CONFIG_DIR, "clap", args, str(tmp_path / "r1"), check=False)
    assert run.returncode != 0
    assert f"{data}/valid.cap: caption file has 11 lines but {data}/valid.tsv has 12 entries" in run.text
    os.remove(os.path.join(data, "spm.model"))
    run = run_hydra_train(TEACHER_CONFIG_DIR, "clap", args, str(tmp_path / "r2"), check=False)
    assert run.returncode != 0 and f"{data}/spm.model: tokenizer (task.tokenizer) not found" in run.text
