"""Fine-tuning augmentations of AudioMAE's recipe (training only; each draws from the
``numpy.random.Generator`` it is given, so a clip's augmentation depends only on the
seed, the epoch and the clip, not on the loader's worker or on a resume).

* :func:`mix_waveforms`: mixup of two clips' 16 kHz waveforms (the partner is cropped or
  zero-padded to the clip's length), ``lam * a + (1 - lam) * b``; the labels are mixed
  by the same ``lam`` (see :func:`mix_labels`).
* :func:`roll_and_gain`: AudioMAE's ``roll_mag_aug``: a random circular shift of the
  waveform and a gain drawn from ``Beta(10, 10) + 0.5``.
* :func:`spec_augment`: SpecAugment on the unnormalised fbank with torchaudio's
  ``FrequencyMasking(freqm)`` and ``TimeMasking(timem)``, one mask per axis (masked bins
  are set to 0 before normalisation, as in AudioMAE and AST).
"""
from __future__ import annotations

import numpy as np
import torch
import torchaudio

from .audio import fit_length


def mix_waveforms(wav: torch.Tensor, other: torch.Tensor, lam: float) -> torch.Tensor:
    """(S,), (S',) -> (S,): ``lam * wav + (1 - lam) * other`` (other cropped / zero-padded to S)."""
    return lam * wav + (1.0 - lam) * fit_length(other, wav.shape[0])


def mix_labels(label: torch.Tensor, other: torch.Tensor, lam: float) -> torch.Tensor:
    """(K,), (K,) multi-hot -> (K,) soft target ``lam * label + (1 - lam) * other``."""
    return lam * label + (1.0 - lam) * other


def roll_and_gain(wav: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(S,) -> (S,): circularly shifted by a uniform offset, scaled by ``Beta(10, 10) + 0.5``."""
    shift = int(rng.integers(wav.shape[0]))
    gain = float(rng.beta(10.0, 10.0)) + 0.5
    return torch.roll(wav, shift) * gain


def spec_augment(fbank: torch.Tensor, freqm: int, timem: int, rng: np.random.Generator) -> torch.Tensor:
    """(T, F) fbank -> (T, F) with one frequency mask of width < ``freqm`` bins and one time
    mask of width < ``timem`` frames (0 disables an axis), drawn by torchaudio under a
    seed taken from ``rng``; the global torch RNG is left untouched."""
    if freqm <= 0 and timem <= 0:
        return fbank
    spec = fbank.t().unsqueeze(0)  # (1, F, T): torchaudio's (channel, freq, time)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        if freqm > 0:
            spec = torchaudio.transforms.FrequencyMasking(freqm)(spec)
        if timem > 0:
            spec = torchaudio.transforms.TimeMasking(timem)(spec)
    return spec.squeeze(0).t()
