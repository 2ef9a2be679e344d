"""Independent reference implementations for the tests, written out in numpy from the
published formulas (no torchaudio, no code under test):

* :func:`slaney_mel_filterbank` -- the Slaney-style mel filterbank of the Auditory Toolbox
  (Slaney 1998), as librosa's ``filters.mel(htk=False, norm="slaney")`` defines it:
  linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4),
  triangles between consecutive mel points, each scaled by 2 / (bandwidth in Hz).
* :func:`kaldi_fbank` -- Kaldi's ``compute-fbank-feats`` recipe (feature-window.cc,
  mel-computations.cc): ``snip_edges`` framing, per-frame DC removal, pre-emphasis 0.97,
  a window, zero padding to a power of two, the power spectrum, triangular filters on the
  mel scale ``1127 ln(1 + f / 700)`` from ``low_freq`` to Nyquist (the Nyquist bin
  unused), and the log floored at float32's epsilon.
"""
from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------- Slaney mel
_F_SP = 200.0 / 3  # Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15
_LOG_STEP = np.log(6.4) / 27.0


def slaney_hz_to_mel(hz):
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz >= _MIN_LOG_HZ, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-10) / _MIN_LOG_HZ) / _LOG_STEP,
                    hz / _F_SP)


def slaney_mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOG_STEP * (mel - _MIN_LOG_MEL)), mel * _F_SP)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) float64 weights: column m is the m-th triangle, area-normalised."""
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    points = slaney_mel_to_hz(np.linspace(slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax), n_mels + 2))
    weights = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        left, centre, right = points[m], points[m + 1], points[m + 2]
        rising = (fft_hz - left) / (centre - left)
        falling = (right - fft_hz) / (right - centre)
        weights[:, m] = np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (right - left)
    return weights


# --------------------------------------------------------------------------- Kaldi fbank
def kaldi_mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def kaldi_fbank(wav: np.ndarray, sample_rate: int = 16000, num_mel_bins: int = 128, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, low_freq: float = 20.0, preemphasis: float = 0.97) -> np.ndarray:
    """(num_frames, num_mel_bins) float64 log-mel energies of a 1-D waveform, Hanning window,
    no dither, no energy term, no mean subtraction (``torchaudio.compliance.kaldi.fbank``'s
    ``window_type='hanning', dither=0, use_energy=False`` in Kaldi's own terms)."""
    wav = np.asarray(wav, dtype=np.float64)
    size = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    num_frames = 1 + (len(wav) - size) // shift
    n_fft = 1 << (size - 1).bit_length()
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1))
    # mel triangles over the FFT bins 0 .. n_fft/2 - 1, equally spaced in Kaldi mel
    mel_low, mel_high = kaldi_mel(low_freq), kaldi_mel(sample_rate / 2)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    bin_mel = kaldi_mel(np.arange(n_fft // 2) * sample_rate / n_fft)
    banks = np.zeros((num_mel_bins, n_fft // 2 + 1))
    for b in range(num_mel_bins):
        left, centre, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
        up = (bin_mel - left) / (centre - left)
        down = (right - bin_mel) / (right - centre)
        banks[b, : n_fft // 2] = np.where((bin_mel > left) & (bin_mel < right), np.minimum(up, down), 0.0)
    out = np.empty((num_frames, num_mel_bins))
    for t in range(num_frames):
        frame = wav[t * shift: t * shift + size].copy()
        frame -= frame.mean()
        frame[1:] -= preemphasis * frame[:-1].copy()
        frame[0] -= preemphasis * frame[0]
        power = np.abs(np.fft.rfft(frame * window, n=n_fft)) ** 2
        out[t] = np.log(np.maximum(banks @ power, np.finfo(np.float32).eps))
    return out
