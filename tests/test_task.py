"""The task refuses inconsistent data with an error that names the file (and line)."""
import os
import shutil

import fairseq  # noqa: F401
import numpy as np
import pytest

import mam_clap_plugin  # noqa: F401
from mam_clap_plugin.data.manifest import ManifestError
from mam_clap_plugin.data.target_store import TargetStoreError, TargetStoreHeader, create_target_store
from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig, MamClapPretrainingTask

from .conftest import TEACHER_DIM, TEACHER_GRID


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
    assert item["target"].shape == (4 * 8, TEACHER_DIM)


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
    header = TargetStoreHeader(teacher="random-test-teacher", grid_freq=TEACHER_GRID[0], grid_time=TEACHER_GRID[1],
                               dim=TEACHER_DIM, sample_rate=48000, seconds=10.0, num_clips=5)
    create_target_store(str(data / "targets" / "valid.tgt"), header).close()
    with pytest.raises(TargetStoreError, match=r"valid\.tgt.*5.*6|valid\.tgt.*6.*5"):
        task(data).load_dataset("valid")


def test_truncated_target_store(data):
    path = data / "targets" / "train.tgt"
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(TargetStoreError, match=r"train\.tgt"):
        task(data)


def test_stores_from_different_teachers(data):
    header = TargetStoreHeader(teacher="another-teacher", grid_freq=TEACHER_GRID[0], grid_time=TEACHER_GRID[1],
                               dim=TEACHER_DIM, sample_rate=48000, seconds=10.0, num_clips=6)
    with create_target_store(str(data / "targets" / "valid.tgt"), header) as w:
        w.write(0, np.zeros((*TEACHER_GRID, TEACHER_DIM), np.float32))
    with pytest.raises(TargetStoreError, match="another-teacher"):
        task(data)


def test_bad_target_length_and_missing_dir(data, tmp_path):
    with pytest.raises(ValueError, match="target_length"):
        MamClapPretrainingTask(MamClapPretrainingConfig(data=str(data), target_length=100))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MamClapPretrainingTask(MamClapPretrainingConfig(data=str(tmp_path / "nowhere")))


def test_no_prefetch_thread_without_workers(data):
    """num_workers=0: the dataset's torch work stays in the main thread (a prefetch thread
    inside torch at interpreter exit aborts the process)."""
    t = task(data)
    t.load_dataset("train")
    itr = t.get_batch_iterator(t.datasets["train"], max_sentences=4, num_workers=0, data_buffer_size=10)
    assert itr.buffer_size == 0
    itr = t.get_batch_iterator(t.datasets["train"], max_sentences=4, num_workers=1, data_buffer_size=10)
    assert itr.buffer_size == 10
