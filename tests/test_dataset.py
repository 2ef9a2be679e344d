"""Tests for mam_clap_plugin.data.dataset.MamClapDataset."""
import logging

import numpy as np
import pytest
import soundfile
import torch

from mam_clap_plugin.data.audio import AudioError, load_audio, normalize_fbank, wav_to_fbank
from mam_clap_plugin.data.dataset import MamClapDataset, on_device
from mam_clap_plugin.data.manifest import read_manifest, write_manifest
from mam_clap_plugin.data.target_store import TargetStoreError, create_target_store, open_target_store

from .conftest import store_header

NAMES = ["a.wav", "b.wav", "c.wav"]


def make_manifest(tmp_path, missing=()):
    """Three 0.5 s wavs (those in ``missing`` are listed but not written); returns the Manifest."""
    for i, name in enumerate(NAMES):
        if name not in missing:
            data = np.random.default_rng(i).uniform(-0.5, 0.5, 8000).astype(np.float32)
            soundfile.write(tmp_path / name, data, 16000)
    write_manifest(str(tmp_path / "train.tsv"), str(tmp_path), NAMES, [8000] * 3)
    return read_manifest(str(tmp_path / "train.tsv"))


def make_store(path, num_clips=3):
    header = store_header(num_clips, dim=4)
    with create_target_store(str(path), header) as writer:
        for i in range(num_clips):
            writer.write(i, np.full(header.clip_shape, float(i)))
    return open_target_store(str(path))


def test_collater_shapes_and_contents(tmp_path):
    manifest = make_manifest(tmp_path)
    store = make_store(tmp_path / "train.tgt")
    dataset = MamClapDataset(manifest, norm_mean=-4.0, norm_std=4.0, labels=[[0], [1, 3], [4]],
                             num_classes=5, target_store=store, alignment=store.header.alignment(64, 8))
    item = dataset[np.int64(1)]
    assert item["id"] == 1 and isinstance(item["id"], int)
    expected = normalize_fbank(wav_to_fbank(load_audio(str(tmp_path / "b.wav")), 1024), -4.0, 4.0)
    torch.testing.assert_close(item["source"], expected)
    assert item["label"].tolist() == [0, 1, 0, 1, 0]
    batch = dataset.collater([dataset[i] for i in range(3)])
    assert batch["id"].tolist() == [0, 1, 2] and batch["id"].dtype == torch.long
    assert batch["nsentences"] == batch["ntokens"] == 3 and batch["num_skipped"] == 0
    assert batch["net_input"]["source"].shape == (3, 1, 1024, 128)
    assert batch["label"].shape == (3, 5) and batch["label"].dtype == torch.float32
    # the store's own fp16 map crosses the loader; on_device aligns it to the student grid
    assert batch["target"].shape == (3, 2, 32, 4) and batch["target"].dtype == torch.float16
    target = on_device(batch, 1024, -4.0, 4.0, dataset.alignment)["target"]
    assert target.shape == (3, 512, 4) and target.dtype == torch.float32
    assert target[2].eq(2.0).all()
    # 0.5 s = 48 fbank frames = 3 time patches of real audio; the other 61 are padding
    mask = batch["target_mask"]
    assert mask.shape == (3, 512) and mask.dtype == torch.bool
    assert mask.view(3, 64, 8)[:, :3].all() and not mask.view(3, 64, 8)[:, 3:].any()


def test_online_teacher_input(tmp_path):
    manifest = make_manifest(tmp_path)
    align = store_header(3).alignment(16, 8)
    dataset = MamClapDataset(manifest, target_length=256, teacher_input=(48000, 480000), alignment=align)
    item = dataset[0]
    assert item["teacher_wav"].shape == (480000,)
    wav48 = item["teacher_wav"]
    assert wav48[:24000].abs().sum() > 0 and not wav48[24000 + 100:].any()  # 0.5 s of audio, then zeros
    expected = normalize_fbank(wav_to_fbank(load_audio(str(tmp_path / "a.wav")), 256), dataset.norm_mean,
                               dataset.norm_std)
    torch.testing.assert_close(item["source"], expected)
    batch = dataset.collater([dataset[0], dataset[1]])
    assert batch["teacher_wav"].shape == (2, 480000) and "target" not in batch
    assert batch["target_mask"].shape == (2, 128) and batch["target_mask"].sum() == 2 * 3 * 8
    with pytest.raises(ValueError, match="not both"):
        MamClapDataset(manifest, target_store=make_store(tmp_path / "y.tgt"), teacher_input=(48000, 10),
                       alignment=align)
    with pytest.raises(ValueError, match="alignment"):
        MamClapDataset(manifest, teacher_input=(48000, 10))


def test_clips_marked_bad_by_the_extractor(tmp_path):
    manifest = make_manifest(tmp_path)
    path = tmp_path / "bad.tgt"
    with create_target_store(str(path), store_header(3, dim=4)) as writer:
        writer.write(0, np.zeros((2, 32, 4)))
        writer.mark_bad(1)
    with pytest.raises(TargetStoreError, match="incomplete, 1 of 3 clips"):
        MamClapDataset(manifest, target_store=open_target_store(str(path)), alignment=store_header(3).alignment(64, 8))
    with create_target_store(str(path), store_header(3, dim=4)) as writer:
        writer.write(0, np.zeros((2, 32, 4)))
        writer.mark_bad(1)
        writer.write(2, np.zeros((2, 32, 4)))
    store = open_target_store(str(path))
    strict = MamClapDataset(manifest, target_store=store, alignment=store.header.alignment(64, 8))
    with pytest.raises(AudioError, match=r"train\.tsv:3.*marked unusable"):
        strict[1]
    lenient = MamClapDataset(manifest, target_store=store, alignment=store.header.alignment(64, 8),
                             skip_bad_files=True)
    assert "marked unusable" in lenient[1]["skipped"] and "skipped" not in lenient[2]


def test_without_labels_or_targets(tmp_path):
    dataset = MamClapDataset(make_manifest(tmp_path), target_length=256, shuffle=False)
    batch = dataset.collater([dataset[0], dataset[2]])
    assert set(batch) == {"id", "nsentences", "ntokens", "num_skipped", "skipped_share", "net_input"}
    assert batch["net_input"]["source"].shape == (2, 1, 256, 128)
    assert len(dataset) == 3 and dataset.num_tokens(0) == dataset.size(1) == 256
    assert dataset.sizes.tolist() == [256] * 3
    assert dataset.ordered_indices().tolist() == [0, 1, 2]


def test_shuffled_order_is_a_permutation(tmp_path):
    """A seeded random permutation of all entries under fairseq's ``numpy_seed`` (which restores
    numpy's global state afterwards), another for another seed, never the identity."""
    from fairseq.data.data_utils import numpy_seed

    names = [f"clip{i}.wav" for i in range(64)]  # the manifest alone: ordering reads no audio
    write_manifest(str(tmp_path / "big.tsv"), str(tmp_path), names, [8000] * len(names))
    dataset = MamClapDataset(read_manifest(str(tmp_path / "big.tsv")))
    state = np.random.get_state()
    orders = {}
    for seed in (1, 1, 2):
        with numpy_seed(seed):
            orders.setdefault(seed, []).append(dataset.ordered_indices().tolist())
    assert orders[1][0] == orders[1][1]  # the same seed, the same order (fairseq's resume relies on it)
    assert sorted(orders[1][0]) == sorted(orders[2][0]) == list(range(64))
    assert orders[1][0] != orders[2][0]
    assert orders[1][0] != list(range(64)) and orders[2][0] != list(range(64))
    # a 64-item permutation: the chance that an identity-like order passes is nil
    assert sum(a == b for a, b in enumerate(orders[1][0])) < 16
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])  # nothing leaks to later tests
    unshuffled = MamClapDataset(read_manifest(str(tmp_path / "big.tsv")), shuffle=False)
    assert unshuffled.ordered_indices().tolist() == list(range(64))


def test_skip_bad_files(tmp_path, caplog):
    dataset = MamClapDataset(make_manifest(tmp_path, missing=("b.wav",)), skip_bad_files=True)
    with caplog.at_level(logging.WARNING, logger="mam_clap_plugin.data"):
        samples = [dataset[i] for i in range(3)]
    assert samples[1]["id"] == 1 and "audio file not found" in samples[1]["skipped"]
    assert "b.wav" in caplog.text and "train.tsv:3" in caplog.text
    batch = dataset.collater(samples)
    assert batch["id"].tolist() == [0, 2] and batch["num_skipped"] == 1
    assert batch["skipped_files"] == [f"{tmp_path / 'train.tsv'}:3: {tmp_path / 'b.wav'}"]
    assert batch["skipped_share"] == pytest.approx(1 / 3) and "b.wav" in batch["skipped_reason"]
    assert batch["nsentences"] == 2 and batch["net_input"]["source"].shape[0] == 2
    assert dataset.collater([]) == {}  # fairseq's padding of uneven shards: its own dummy batch


def test_bad_file_raises_with_manifest_line(tmp_path):
    dataset = MamClapDataset(make_manifest(tmp_path, missing=("c.wav",)))
    with pytest.raises(AudioError) as err:
        dataset[2]
    assert f"{tmp_path / 'train.tsv'}:4" in str(err.value) and "c.wav" in str(err.value)


def test_mismatched_inputs_are_rejected(tmp_path):
    manifest = make_manifest(tmp_path)
    with pytest.raises(TargetStoreError, match="store has 2 clips but the manifest has 3"):
        MamClapDataset(manifest, target_store=make_store(tmp_path / "x.tgt", num_clips=2),
                       alignment=store_header(2).alignment(64, 8))
    with pytest.raises(ValueError, match="2 label rows for 3 entries"):
        MamClapDataset(manifest, labels=[[0], [1]], num_classes=2)
    with pytest.raises(ValueError, match="num_classes=0"):
        MamClapDataset(manifest, labels=[[0], [1], [0]])
