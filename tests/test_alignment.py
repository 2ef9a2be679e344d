"""Tests for mam_clap_plugin.data.alignment: teacher cells by seconds and Hz, loss masks."""
import numpy as np
import pytest
import torch
import torchaudio

from mam_clap_plugin.data.alignment import (
    align_tokens,
    alignment,
    loss_mask,
    real_time_patches,
    student_row_centres_hz,
    teacher_bands,
)

#: LAION-CLAP band edges: Slaney mel, 64 bins over 50-14000 Hz, split in 2 (final) or 4 (stage 3).
FINAL_EDGES = [50.0, 2229.63, 14000.0]
STAGE3_EDGES = [50.0, 883.9, 2229.63, 5587.6, 14000.0]


def test_student_rows_follow_the_kaldi_filterbank():
    centres = student_row_centres_hz()
    assert centres.shape == (8,) and np.all(np.diff(centres) > 0)
    assert 20 < centres[0] < 200 and 6000 < centres[-1] < 8000
    # each row's centre lies between the peaks of its first and last kaldi filter
    banks, _ = torchaudio.compliance.kaldi.get_mel_banks(128, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
    peaks = banks.argmax(dim=1).float() * 16000 / 512
    for f in range(8):
        assert peaks[16 * f] - 32 <= centres[f] <= peaks[16 * f + 15] + 32


def test_bands_by_hz_not_by_position():
    assert teacher_bands(FINAL_EDGES, 8).tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert teacher_bands(STAGE3_EDGES, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    # a teacher that only covers up to 1 kHz: everything above lands in its top band
    assert teacher_bands([50.0, 500.0, 1000.0], 8).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_final_map_2x32_onto_64x8():
    align = alignment(2, 32, 10.0, FINAL_EDGES, 64)
    grid = align.index.view(64, 8)
    assert align.index.dtype == torch.int64 and align.index.shape == (512,)
    # cell = 10 s / 32 = 0.3125 s; student centre (t + 0.5) * 0.16 s
    assert grid[:3, 0].tolist() == [0, 0, 1] and grid[10, 0] == 5
    assert grid[2].tolist() == [1] * 5 + [33] * 3
    covered = align.covered.view(64, 8)[:, 0]
    assert covered[:62].all() and not covered[62:].any()  # 10.0 s and 10.16 s are past the clip
    assert grid[63, 0] == 31


def test_stage3_map_4x64_and_a_shorter_teacher_clip():
    grid = alignment(4, 64, 10.0, STAGE3_EDGES, 64).index.view(64, 8)
    assert grid[:4, 0].tolist() == [0, 1, 2, 3] and grid[21, 0] == 22  # 3.44 s -> cell 22
    assert (grid[0] // 64).tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    short = alignment(2, 32, 7.0, FINAL_EDGES, 64)  # e.g. a 7 s teacher
    assert short.covered.view(64, 8)[:, 0].sum() == 44  # centres below 7 s: t = 0..43


def test_alignment_is_cached_and_validated():
    first = alignment(2, 32, 10.0, FINAL_EDGES, 64)
    assert alignment(2, 32, 10.0, tuple(FINAL_EDGES), 64) is first
    assert alignment(2, 32, 10.0, FINAL_EDGES, 32) is not first
    with pytest.raises(ValueError, match="3 frequency edges for 4 teacher bands"):
        alignment(4, 32, 10.0, FINAL_EDGES, 64)


def test_align_tokens_gathers_cells():
    maps = torch.randn(2, 2, 32, 5)
    align = alignment(2, 32, 10.0, FINAL_EDGES, 16)
    out = align_tokens(maps, align)
    assert out.shape == (2, 128, 5)
    torch.testing.assert_close(out[1, 10 * 8 + 6], maps[1, 1, 5])
    torch.testing.assert_close(out[0, 3], maps[0, 0, 0])


@pytest.mark.parametrize("samples,patches", [(0, 1), (100, 1), (400, 1), (2960, 2), (2800, 1), (8000, 3),
                                             (160000, 63), (10 ** 6, 64)])
def test_real_time_patches(samples, patches):
    # frames = 1 + (S - 400) // 160; 16 frames per patch; at most 1024 frames
    assert real_time_patches(samples, 1024) == patches


def test_loss_mask_combines_padding_and_coverage():
    covered = alignment(2, 32, 10.0, FINAL_EDGES, 64).covered
    mask = loss_mask(torch.tensor([3, 64]), covered, 8).view(2, 64, 8)
    assert mask[0, :3].all() and not mask[0, 3:].any()
    assert mask[1, :62].all() and not mask[1, 62:].any()
