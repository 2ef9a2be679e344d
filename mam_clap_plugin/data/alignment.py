"""Mapping a teacher's token map onto the student's patch grid, by seconds and by Hz.

The student (this project's encoder) sees a 128-bin Kaldi fbank: HTK mel scale from
20 Hz to 8000 Hz (16 kHz audio), one frame every 10 ms. Its 16x16 patches form a
time-major (time_patches, freq_patches) grid, 64 x 8 for 1024 frames: time patch ``t``
covers frames ``16t .. 16t+15`` (centre ``(t + 0.5) * 0.16`` s), frequency row ``f``
covers mel bins ``16f .. 16f+15``.

A teacher map is a (grid_freq, grid_time) grid of cells. Its time cells split the
first ``seconds`` of audio into equal parts (LAION-CLAP: 32 cells over 10 s, 0.3125 s
each). Its frequency cells are bands with edges ``freq_edges_hz`` (LAION-CLAP's final
map: 2 bands, each 32 of its 64 Slaney-mel bins between 50 and 14000 Hz).

Each student token takes one teacher cell:
    time:  the cell that contains the token's centre time; a token whose centre lies
           beyond ``seconds`` is *not covered* (it gets the last cell but is left out
           of the loss).
    freq:  the band that contains the row's centre frequency: the HTK-mel midpoint of
           the row's lower and upper filter edges, in Hz; rows below the teacher's
           lowest edge take band 0, rows above its highest edge the top band.

For LAION-CLAP's final map (band edge ~2.3 kHz) the student rows map as
``[0, 0, 0, 0, 0, 1, 1, 1]`` (rows 0-4 end below ~2.1 kHz); see ``tests/test_alignment.py``.

Student tokens that are pure padding (all 16 frames after the end of the clip) are
excluded from the loss too (:func:`real_time_patches`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torchaudio.compliance.kaldi import inverse_mel_scale_scalar, mel_scale_scalar

from ..modules.encoder import PATCH_SIZE as PATCH
from .audio import NUM_MEL_BINS as STUDENT_MEL_BINS
from .audio import SAMPLE_RATE, SHIFT_SAMPLES, num_fbank_frames

STUDENT_LOW_HZ = 20.0  # Kaldi fbank's default low_freq (wav_to_fbank keeps it)
STUDENT_HIGH_HZ = SAMPLE_RATE / 2
PATCH_SECONDS = PATCH * SHIFT_SAMPLES / SAMPLE_RATE  # 0.16


class Alignment(NamedTuple):
    """Teacher cell of each student token (token ``t * freq_patches + f``).

    index:   (N,) int64, flat index ``ft * grid_time + tt`` into the teacher map.
    covered: (N,) bool, False where the token's centre time is beyond the teacher's clip.
    """

    index: torch.Tensor
    covered: torch.Tensor


def student_row_centres_hz(freq_patches: int = STUDENT_MEL_BINS // PATCH) -> np.ndarray:
    """(freq_patches,) centre frequency in Hz of each student frequency row.

    Kaldi places ``num_bins + 2`` points equally on the HTK mel scale from 20 to 8000 Hz;
    bin ``i`` spans points ``i .. i + 2``. Row ``f`` spans its first bin's lower point to
    its last bin's upper point; its centre is the mel midpoint of the two.
    """
    if STUDENT_MEL_BINS % freq_patches:
        raise ValueError(f"freq_patches={freq_patches} does not divide {STUDENT_MEL_BINS} mel bins")
    bins = STUDENT_MEL_BINS // freq_patches
    low, high = mel_scale_scalar(STUDENT_LOW_HZ), mel_scale_scalar(STUDENT_HIGH_HZ)
    step = (high - low) / (STUDENT_MEL_BINS + 1)
    rows = np.arange(freq_patches)
    centre_points = (rows * bins + (rows + 1) * bins + 1) / 2.0
    return np.array([inverse_mel_scale_scalar(low + p * step) for p in centre_points])


def teacher_bands(freq_edges_hz: Sequence[float], freq_patches: int) -> np.ndarray:
    """(freq_patches,) teacher band of each student row (the band holding the row centre)."""
    edges = np.asarray(freq_edges_hz, dtype=np.float64)
    inner = edges[1:-1]  # band k is [edges[k], edges[k+1])
    return np.searchsorted(inner, student_row_centres_hz(freq_patches), side="right").astype(np.int64)


def teacher_time_cells(grid_time: int, seconds: float, time_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """((time_patches,) int64 cell, (time_patches,) bool covered) of each student time patch."""
    centres = (np.arange(time_patches) + 0.5) * PATCH_SECONDS
    covered = centres < seconds
    cells = np.clip(np.floor(centres * grid_time / seconds), 0, grid_time - 1).astype(np.int64)
    return cells, covered


@functools.lru_cache(maxsize=64)
def _alignment(grid_freq: int, grid_time: int, seconds: float, freq_edges_hz: tuple,
               time_patches: int, freq_patches: int) -> Alignment:
    if len(freq_edges_hz) != grid_freq + 1:
        raise ValueError(f"{len(freq_edges_hz)} frequency edges for {grid_freq} teacher bands")
    tt, covered = teacher_time_cells(grid_time, seconds, time_patches)
    ft = teacher_bands(freq_edges_hz, freq_patches)
    index = ft[None, :] * grid_time + tt[:, None]  # (time_patches, freq_patches)
    covered = np.repeat(covered, freq_patches)
    return Alignment(torch.from_numpy(index.reshape(-1)), torch.from_numpy(covered))


def alignment(grid_freq: int, grid_time: int, seconds: float, freq_edges_hz: Sequence[float],
              time_patches: int, freq_patches: int = STUDENT_MEL_BINS // PATCH) -> Alignment:
    """Teacher cell of every student token (cached per geometry; do not modify the result)."""
    if time_patches < 1 or freq_patches < 1:
        raise ValueError(f"need time_patches, freq_patches >= 1, got {time_patches}, {freq_patches}")
    return _alignment(int(grid_freq), int(grid_time), float(seconds), tuple(float(e) for e in freq_edges_hz),
                      int(time_patches), int(freq_patches))


@functools.lru_cache(maxsize=64)
def _index_on(align: Alignment, device: torch.device) -> torch.Tensor:
    return align.index.to(device)


def align_tokens(teacher_map: torch.Tensor, align: Alignment) -> torch.Tensor:
    """Gather teacher cells onto the student grid.

    teacher_map: (..., grid_freq, grid_time, C) -> (..., N, C) with N = len(align.index).
    The index is copied to the map's device once per alignment and device (cached).
    """
    flat = teacher_map.flatten(-3, -2)
    index = align.index if align.index.device == flat.device else _index_on(align, flat.device)
    return flat.index_select(-2, index)


def real_time_patches(num_samples: int, target_length: int) -> int:
    """Student time patches holding at least one real (non-padding) fbank frame.

    ``num_samples`` is the clip's length at 16 kHz; a clip shorter than one window still
    yields one frame (``wav_to_fbank`` pads it).
    """
    frames = min(num_fbank_frames(num_samples), target_length)
    return -(-frames // PATCH)


def loss_mask(num_real_patches: torch.Tensor, covered: torch.Tensor, freq_patches: int) -> torch.Tensor:
    """(B, N) bool, True where a token enters the target loss.

    num_real_patches: (B,) from :func:`real_time_patches`; covered: (N,) from :func:`alignment`.
    """
    time_patches = covered.numel() // freq_patches
    t = torch.arange(time_patches, device=num_real_patches.device).repeat_interleave(freq_patches)
    return (t[None, :] < num_real_patches[:, None]) & covered.to(num_real_patches.device)[None, :]
