"""The pretraining task (mam_clap_pretraining): its data, its online teacher, and clear refusals.

It loads labels and teacher targets, reads no file in its constructor, keeps the online teacher
outside the model, and refuses inconsistent data with an error that names the file (and line)."""
import os
import shutil

import fairseq  # noqa: F401
import numpy as np
import pytest
import torch

import mam_clap_plugin  # noqa: F401
from mam_clap_plugin.data.manifest import ManifestError
from mam_clap_plugin.data.target_store import TargetStoreError, create_target_store
from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig, MamClapPretrainingTask

from .conftest import TEACHER_DIM, TEACHER_GRID, store_header


@pytest.fixture
def data(tone_set, tmp_path):
    return shutil.copytree(tone_set, tmp_path / "data")


def task(data, **kw):
    cfg = MamClapPretrainingConfig(data=str(data), labels="lbl", target_store=str(data / "targets"),
                                   target_length=64, **kw)
    return MamClapPretrainingTask.setup_task(cfg)


def test_loads_labels_and_targets(data):
    t = task(data)
    t.load_dataset("train")
    item = t.datasets["train"][0]
    assert t.num_classes == 3 and t.target_dim == TEACHER_DIM
    assert item["source"].shape == (64, 128)
    assert item["label"].tolist() == [1.0, 0.0, 0.0]
    assert item["target"].shape == (2, 32, TEACHER_DIM) and item["target"].dtype == torch.float16  # the store's map
    batch = t.on_device(t.datasets["train"].collater([item]), torch.nn.Linear(1, 1))  # aligned on the model's device
    assert batch["target"].shape == (1, 4 * 8, TEACHER_DIM) and batch["target"].dtype == torch.float32


def test_empty_manifest(data):
    (data / "valid.tsv").write_text(str(data / "audio") + "\n")
    with pytest.raises(ManifestError, match="valid.tsv"):
        task(data).load_dataset("valid")


def test_unknown_class_id(data):
    lines = (data / "train.lbl").read_text().splitlines()
    lines[2] = "7"
    (data / "train.lbl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.lbl:3"):
        task(data).load_dataset("train")


def test_target_store_with_wrong_clip_count(data):
    header = store_header(5)
    create_target_store(str(data / "targets" / "valid.tgt"), header).close()
    with pytest.raises(TargetStoreError, match=r"valid\.tgt.*5.*6|valid\.tgt.*6.*5"):
        task(data).load_dataset("valid")


def test_truncated_target_store(data):
    path = data / "targets" / "train.tgt"
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(TargetStoreError, match=r"train\.tgt"):
        task(data).load_dataset("valid")


def test_stores_from_different_teachers(data):
    header = store_header(6, teacher="another-teacher")
    with create_target_store(str(data / "targets" / "valid.tgt"), header) as w:
        w.write(0, np.zeros((*TEACHER_GRID, TEACHER_DIM), np.float32))
    other = r"valid\.tgt: made with another teacher or map than train\.tgt.*'teacher'"
    with pytest.raises(TargetStoreError, match=other):
        task(data).load_dataset("train")


def test_bad_target_length_and_missing_dir(data, tmp_path):
    with pytest.raises(ValueError, match="target_length=100 must be a positive multiple of 16"):
        MamClapPretrainingTask(MamClapPretrainingConfig(data=str(data), target_length=100))
    missing = MamClapPretrainingTask(MamClapPretrainingConfig(data=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="task.data: directory .*nowhere"):
        missing.load_dataset("train")


def test_target_length_must_fill_decoder_windows(data):
    """80 frames = 5 time patches: whole patches, but not whole 4-patch decoder windows."""
    from omegaconf import OmegaConf

    from mam_clap_plugin.models.supmam_clap import SupMamClapConfig

    t = MamClapPretrainingTask(MamClapPretrainingConfig(data=str(data), target_length=80))
    cfg = OmegaConf.structured(SupMamClapConfig(encoder_embed_dim=32, encoder_layers=1, encoder_attention_heads=2,
                                                decoder_embed_dim=16, decoder_attention_heads=2,
                                                _name="supmam_clap"))
    with pytest.raises(ValueError, match=r"target_length=80 must be a multiple of 64 frames.*decoder_window_time=4"):
        t.build_model(cfg)
    cfg.decoder_window_time, cfg.decoder_shift_time = 5, 2  # a 5-patch window tiles 80 frames, not 1024
    with pytest.raises(ValueError, match=r"max_frames=1024 .*64x8 patch grid.*multiples of 80 frames"):
        t.build_model(cfg)
    cfg.max_frames = 640
    assert t.build_model(cfg).decoder is not None


def test_constructor_reads_nothing(tmp_path, clap_checkpoint):
    """fairseq rebuilds the task from a checkpoint's config on another machine: none of the
    files it names needs to exist until a dataset is loaded."""
    gone = tmp_path / "gone"
    cfg = MamClapPretrainingConfig(data=str(gone), labels="lbl", target_store=str(gone / "targets"),
                                   teacher_checkpoint=str(gone / "clap.pt"), target_length=64)
    t = MamClapPretrainingTask.setup_task(cfg)
    with pytest.raises(FileNotFoundError, match=r"task.data: directory .*gone"):
        t.load_dataset("train")
    online = MamClapPretrainingTask.setup_task(MamClapPretrainingConfig(
        data=str(gone), teacher_checkpoint=str(gone / "clap.pt"), target_length=64))
    from mam_clap_plugin.teacher import ClapCheckpointError

    with pytest.raises(ClapCheckpointError, match="clap.pt: teacher checkpoint not found"):
        _ = online.target_dim


def test_no_prefetch_thread_without_workers(data):
    """num_workers=0: the dataset's torch work stays in the main thread (a prefetch thread
    inside torch at interpreter exit aborts the process)."""
    t = task(data)
    t.load_dataset("train")
    itr = t.get_batch_iterator(t.datasets["train"], max_sentences=4, num_workers=0, data_buffer_size=10)
    assert itr.buffer_size == 0
    itr = t.get_batch_iterator(t.datasets["train"], max_sentences=4, num_workers=1, data_buffer_size=10)
    assert itr.buffer_size == 10


def test_store_must_match_the_configured_teacher(data, tmp_path):
    with pytest.raises(TargetStoreError, match=r"'final' map but task.teacher_layer=stage3"):
        task(data, teacher_layer="stage3").load_dataset("train")
    with pytest.raises(TargetStoreError, match="projection=False but task.teacher_projection=True"):
        task(data, teacher_projection=True).load_dataset("train")
    other = tmp_path / "other.pt"
    other.write_bytes(b"another checkpoint")
    with pytest.raises(TargetStoreError, match=rf"sha256 0000.*teacher_checkpoint={other} has sha256"):
        task(data, teacher_checkpoint=str(other)).load_dataset("train")


def test_online_teacher_stays_outside_the_model(data, clap_checkpoint):
    import torch

    cfg = MamClapPretrainingConfig(data=str(data), labels="lbl", teacher_checkpoint=clap_checkpoint, target_length=64)
    t = MamClapPretrainingTask.setup_task(cfg)
    assert t.target_header is None and t.target_dim == 128
    t.load_dataset("train")
    ds = t.datasets["train"]
    batch = ds.collater([ds[0], ds[1]])
    assert batch["teacher_wav"].shape == (2, 480000) and "target" not in batch
    t.teacher.train()  # stays frozen in eval mode
    assert not t.teacher.training and not any(p.requires_grad for p in t.teacher.parameters())
    batch = t.online_targets(batch)
    assert "teacher_wav" not in batch and batch["target"].shape == (2, 4 * 8, 128)
    with torch.no_grad():
        maps = t.teacher(ds[0]["teacher_wav"][None])
    # student token (t=1, f=6) takes teacher band 1, time cell 0 (0.24 s)
    torch.testing.assert_close(batch["target"][0, 1 * 8 + 6], maps[0, 1, 0])
    assert batch["target_mask"].all()  # 0.6 s = 58 frames: real audio in all 4 time patches


def test_online_teacher_needs_trust_for_pickled_objects(data, clap_checkpoint, tmp_path):
    import argparse

    import torch

    from mam_clap_plugin.teacher import ClapCheckpointError

    state = torch.load(clap_checkpoint, weights_only=True)
    state["args"] = argparse.Namespace(lr=1e-4)  # as old training checkpoints hold
    path = str(tmp_path / "with-args.pt")
    torch.save(state, path)
    cfg = dict(data=str(data), labels="lbl", teacher_checkpoint=path, target_length=64)
    with pytest.raises(ClapCheckpointError, match=r"with-args\.pt.*teacher_trusted=true"):
        MamClapPretrainingTask.setup_task(MamClapPretrainingConfig(**cfg)).load_dataset("train")
    assert MamClapPretrainingTask.setup_task(MamClapPretrainingConfig(**cfg, teacher_trusted=True)).target_dim == 128
