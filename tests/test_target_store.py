"""Tests for mam_clap_plugin.data.target_store: format, validation, alignment."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from mam_clap_plugin.data.alignment import align_tokens
from mam_clap_plugin.data.target_store import (
    BAD_AUDIO,
    PENDING,
    WRITTEN,
    TargetStoreError,
    create_target_store,
    open_target_store,
    open_target_store_for_writing,
)

from .conftest import store_header


def make_header(num_clips=3, grid_freq=2, grid_time=32, dim=4, **extra):
    return store_header(num_clips, teacher="clap-test", grid=(grid_freq, grid_time), dim=dim, extra=extra)


def make_store(path, header, seed=0):
    """Write random clips; returns the float32 arrays written."""
    rng = np.random.default_rng(seed)
    clips = [rng.normal(size=header.clip_shape).astype(np.float32) for _ in range(header.num_clips)]
    with create_target_store(str(path), header) as writer:
        for i, clip in enumerate(clips):
            writer.write(np.int64(i), clip)
    return clips


def test_round_trip_fp16(tmp_path):
    header = make_header(layer=-1)
    clips = make_store(tmp_path / "train.tgt", header)
    store = open_target_store(str(tmp_path / "train.tgt"))
    assert store.header == header and store.header.extra == {"layer": -1}
    assert len(store) == 3
    for i, clip in enumerate(clips):
        assert store[i].dtype == np.float16 and store[i].shape == (2, 32, 4)
        np.testing.assert_array_equal(store[i], clip.astype(np.float16))
    with pytest.raises(IndexError, match="clip index 3 outside"):
        store[3]


def test_byte_layout(tmp_path):
    header = make_header(num_clips=2)
    clips = make_store(tmp_path / "a.tgt", header)
    raw = (tmp_path / "a.tgt").read_bytes()
    json_len = int.from_bytes(raw[8:12], "little")
    assert raw[:8] == b"MAMCLAPT"
    fields = json.loads(raw[12:12 + json_len])
    assert fields["grid_time"] == 32 and fields["version"] == 2 and fields["layer"] == "final"
    assert set(raw[12 + json_len:4096]) == {0}
    assert list(raw[4096:4098]) == [WRITTEN, WRITTEN] and set(raw[4098:8192]) == {0}
    assert len(raw) == 8192 + 2 * 2 * 32 * 4 * 2
    array = np.frombuffer(raw[8192:], dtype="<f2").reshape(2, 2, 32, 4)
    np.testing.assert_array_equal(array[1], clips[1].astype(np.float16))


def test_clip_states_and_completeness(tmp_path):
    writer = create_target_store(str(tmp_path / "a.tgt"), make_header(num_clips=3))
    writer.write(1, np.ones((2, 32, 4)))
    writer.flush()
    store = open_target_store(str(tmp_path / "a.tgt"))
    assert store.states().tolist() == [PENDING, WRITTEN, PENDING]
    with pytest.raises(TargetStoreError, match=r"a\.tgt: incomplete, 2 of 3 clips not extracted yet \(first: clip 0\)"):
        store.check_complete()
    writer.write(0, np.ones((2, 32, 4)))
    writer.mark_bad(2)
    writer.close()
    assert store.states().tolist() == [WRITTEN, WRITTEN, BAD_AUDIO]
    assert store.check_complete().tolist() == [2]
    assert not store[2].any() and (store[1] == 1).all()
    with pytest.raises(TargetStoreError, match="after close"):
        writer.write(0, np.ones((2, 32, 4)))


def test_resume_and_shared_writers(tmp_path):
    path = str(tmp_path / "a.tgt")
    first = open_target_store_for_writing(path, make_header(num_clips=4))
    second = open_target_store_for_writing(path, make_header(num_clips=4))  # another shard, same file
    first.write(0, np.full((2, 32, 4), 1.0))
    second.write(3, np.full((2, 32, 4), 3.0))
    first.close()
    second.close()
    resumed = open_target_store_for_writing(path, make_header(num_clips=4))
    assert resumed.states.tolist() == [WRITTEN, PENDING, PENDING, WRITTEN]
    resumed.close()
    store = open_target_store(path)
    assert (store[0] == 1).all() and (store[3] == 3).all()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_refuses_to_mix_teachers(tmp_path):
    path = str(tmp_path / "a.tgt")
    open_target_store_for_writing(path, make_header(num_clips=4)).close()
    other = store_header(4, teacher="clap-test", grid=(2, 32), dim=4, checkpoint_sha256="f" * 64)
    with pytest.raises(TargetStoreError, match=r"refusing to mix them \(checkpoint_sha256: '0+' vs 'f+'\)"):
        open_target_store_for_writing(path, other)
    with pytest.raises(TargetStoreError, match="layer"):
        open_target_store_for_writing(path, store_header(4, teacher="clap-test", dim=4, layer="stage3"))
    with pytest.raises(TargetStoreError, match="num_clips: 4 vs 5"):
        open_target_store_for_writing(path, make_header(num_clips=5))


def test_write_validates_shape_and_values(tmp_path):
    with create_target_store(str(tmp_path / "a.tgt"), make_header()) as writer:
        with pytest.raises(TargetStoreError, match=r"shape \(32, 2, 4\), expected"):
            writer.write(0, np.zeros((32, 2, 4)))
        with pytest.raises(TargetStoreError, match="NaN/Inf"):
            writer.write(0, np.full((2, 32, 4), np.nan))
        with pytest.raises(TargetStoreError, match="float16 range"):
            writer.write(0, np.full((2, 32, 4), 1e6))
        with pytest.raises(IndexError):
            writer.write(3, np.zeros((2, 32, 4)))


def test_check_clip_count_and_dim(tmp_path):
    make_store(tmp_path / "a.tgt", make_header())
    store = open_target_store(str(tmp_path / "a.tgt"))
    store.check(3, dim=4)
    with pytest.raises(TargetStoreError, match="store has 3 clips but the manifest has 5") as err:
        store.check(5)
    assert "a.tgt" in str(err.value)
    with pytest.raises(TargetStoreError, match="target dim 4 but 512 was expected"):
        store.check(3, dim=512)


def test_truncated_file_reports_sizes(tmp_path):
    path = tmp_path / "a.tgt"
    make_store(path, make_header())
    with open(path, "r+b") as f:
        f.truncate(8192 + 1000)
    message = r"file is 9192 bytes but the header .* needs 9728 bytes"
    with pytest.raises(TargetStoreError, match=message) as err:
        open_target_store(str(path))
    assert str(path) in str(err.value)


def test_bad_magic_missing_and_bad_header(tmp_path):
    with pytest.raises(TargetStoreError, match="not found"):
        open_target_store(str(tmp_path / "none.tgt"))
    (tmp_path / "magic.tgt").write_bytes(b"NOTMAGIC" + bytes(8000))
    with pytest.raises(TargetStoreError, match="bad magic") as err:
        open_target_store(str(tmp_path / "magic.tgt"))
    assert "magic.tgt" in str(err.value)
    garbage = b"{not json"
    (tmp_path / "json.tgt").write_bytes(b"MAMCLAPT" + len(garbage).to_bytes(4, "little") + garbage)
    with pytest.raises(TargetStoreError, match="unparsable JSON header"):
        open_target_store(str(tmp_path / "json.tgt"))


def write_raw_header(path, fields):
    payload = json.dumps(fields).encode()
    path.write_bytes(b"MAMCLAPT" + len(payload).to_bytes(4, "little") + payload)


def test_missing_header_field_and_old_version(tmp_path):
    fields = {"teacher": "t", "checkpoint_sha256": "0" * 64, "layer": "final", "projection": False, "grid_freq": 2,
              "grid_time": 32, "sample_rate": 48000, "seconds": 10.0, "freq_edges_hz": [50, 2000, 14000],
              "num_clips": 1, "version": 2}
    write_raw_header(tmp_path / "a.tgt", fields)
    with pytest.raises(TargetStoreError, match=r"missing fields \['dim'\]"):
        open_target_store(str(tmp_path / "a.tgt"))
    write_raw_header(tmp_path / "a.tgt", {**fields, "dim": 4, "version": 1})
    with pytest.raises(TargetStoreError, match="unsupported version 1.*re-extract"):
        open_target_store(str(tmp_path / "a.tgt"))


@pytest.mark.parametrize("field,value,message", [
    ("layer", "stage2", "'layer' must be one of"),
    ("projection", 1, "'projection' must be true or false"),
    ("freq_edges_hz", [50.0, 14000.0], "grid_freq \\+ 1 = 3"),
    ("freq_edges_hz", [50.0, 14000.0, 2000.0], "ascending"),
    ("checkpoint_sha256", "", "'checkpoint_sha256' must be a non-empty string"),
])
def test_invalid_header_fields(tmp_path, field, value, message):
    header = make_header()
    setattr(header, field, value)
    with pytest.raises(TargetStoreError, match=message):
        create_target_store(str(tmp_path / "a.tgt"), header)


def test_aligned_and_pickle(tmp_path):
    clips = make_store(tmp_path / "a.tgt", make_header())
    store = pickle.loads(pickle.dumps(open_target_store(str(tmp_path / "a.tgt"))))
    aligned = align_tokens(torch.from_numpy(np.array(store[2])), store.header.alignment(64, 8)).float()
    assert aligned.dtype == torch.float32 and aligned.shape == (512, 4)
    expected = torch.from_numpy(clips[2].astype(np.float16).astype(np.float32))
    torch.testing.assert_close(aligned[10 * 8 + 5], expected[1, 5])  # t=10, f=5 -> (band 1, cell 5)
    torch.testing.assert_close(aligned[10 * 8 + 4], expected[0, 5])  # f=4 (~2.2 kHz) -> band 0
    torch.testing.assert_close(aligned[0], expected[0, 0])
    assert os.path.getsize(tmp_path / "a.tgt") == 8192 + 3 * 2 * 32 * 4 * 2
