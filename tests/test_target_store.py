"""Tests for mam_clap_plugin.data.target_store: format, validation, alignment."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from mam_clap_plugin.data.target_store import (
    TargetStoreError,
    TargetStoreHeader,
    alignment_index,
    create_target_store,
    open_target_store,
)


def make_header(num_clips=3, grid_freq=2, grid_time=32, dim=4, **extra):
    return TargetStoreHeader(teacher="clap-test", grid_freq=grid_freq, grid_time=grid_time, dim=dim,
                             sample_rate=48000, seconds=10.0, num_clips=num_clips, extra=extra)


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
    assert json.loads(raw[12:12 + json_len])["grid_time"] == 32
    assert set(raw[12 + json_len:4096]) == {0}
    assert len(raw) == 4096 + 2 * 2 * 32 * 4 * 2
    array = np.frombuffer(raw[4096:], dtype="<f2").reshape(2, 2, 32, 4)
    np.testing.assert_array_equal(array[1], clips[1].astype(np.float16))


def test_unwritten_clips_are_zero(tmp_path):
    writer = create_target_store(str(tmp_path / "a.tgt"), make_header(num_clips=2))
    writer.write(1, np.ones((2, 32, 4)))
    writer.close()
    store = open_target_store(str(tmp_path / "a.tgt"))
    assert not store[0].any() and (store[1] == 1).all()
    with pytest.raises(TargetStoreError, match="after close"):
        writer.write(0, np.ones((2, 32, 4)))


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
        f.truncate(4096 + 1000)
    message = r"file is 5096 bytes but the header .* needs 5632 bytes"
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


def test_missing_header_field(tmp_path):
    fields = {"teacher": "t", "grid_freq": 2, "grid_time": 32, "sample_rate": 48000,
              "seconds": 10.0, "num_clips": 1, "version": 1}
    payload = json.dumps(fields).encode()
    (tmp_path / "a.tgt").write_bytes(b"MAMCLAPT" + len(payload).to_bytes(4, "little") + payload)
    with pytest.raises(TargetStoreError, match=r"missing fields \['dim'\]"):
        open_target_store(str(tmp_path / "a.tgt"))


def test_alignment_2x32_teacher_onto_64x8():
    index = alignment_index(make_header(grid_freq=2, grid_time=32), 64, 8)
    assert index.shape == (512,) and index.dtype == np.int64
    grid = index.reshape(64, 8)  # [t, f]
    # teacher cell = 10 s / 32 = 0.3125 s; student centre (t + 0.5) * 0.16 s
    assert grid[0, 0] == 0            # 0.08 s -> cell 0
    assert grid[1, 0] == 0            # 0.24 s -> cell 0
    assert grid[2, 0] == 1            # 0.40 s -> cell 1
    assert grid[10, 0] == 5           # 1.68 s -> cell 5
    assert grid[62, 0] == 31          # 10.0 s -> past the end, clipped
    assert grid[63, 0] == 31          # 10.16 s -> clipped
    # frequency: f = 0..3 -> teacher row 0, f = 4..7 -> row 1 (offset 32)
    assert list(grid[2]) == [1, 1, 1, 1, 33, 33, 33, 33]
    assert grid[10, 5] == 32 + 5


def test_alignment_4x64_teacher_onto_64x8():
    grid = alignment_index(make_header(grid_freq=4, grid_time=64), 64, 8).reshape(64, 8)
    tt = grid[:, 0]
    # teacher cell = 0.15625 s, slightly shorter than a 0.16 s student patch
    assert list(tt[:4]) == [0, 1, 2, 3]
    assert tt[20] == 20 and tt[21] == 22   # 3.28 s -> 20.99, 3.44 s -> 22.02: cell 21 skipped
    assert tt[31] == 32 and tt[62] == 63 and tt[63] == 63
    ft = grid[0] // 64
    assert list(ft) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert grid[31, 5] == 2 * 64 + 32


def test_alignment_is_cached_and_read_only():
    header = make_header()
    first = alignment_index(header, 64, 8)
    assert alignment_index(header, 64, 8) is first
    assert alignment_index(header, 32, 8) is not first
    with pytest.raises(ValueError):
        first[0] = 1


def test_aligned_and_pickle(tmp_path):
    clips = make_store(tmp_path / "a.tgt", make_header())
    store = pickle.loads(pickle.dumps(open_target_store(str(tmp_path / "a.tgt"))))
    aligned = store.aligned(2, 64, 8)
    assert aligned.dtype == torch.float32 and aligned.shape == (512, 4)
    expected = torch.from_numpy(clips[2].astype(np.float16).astype(np.float32))
    torch.testing.assert_close(aligned[10 * 8 + 5], expected[1, 5])  # t=10, f=5 -> (ft=1, tt=5)
    torch.testing.assert_close(aligned[0], expected[0, 0])
    assert os.path.getsize(tmp_path / "a.tgt") == 4096 + 3 * 2 * 32 * 4 * 2
