"""Signal steps shared by the demo generators (``examples/prepare/make_demo_data.py`` and
``make_demo_keywords.py``): band-limited noise, placing a word in a clip, background noise
and level, int16 quantisation. Every random draw comes from the ``rng`` passed in.
"""
from __future__ import annotations

import numpy as np

PEAK_LEVEL_RANGE = (0.3, 0.9)  # final peak amplitude (about -10.5 .. -0.9 dBFS)
NOISE_DB_BELOW_PEAK = (40.0, 55.0)  # background noise RMS relative to the signal peak


def bandpass_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    """``n`` samples of Gaussian noise with every FFT bin outside [lo, hi] Hz zeroed."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0.0
    return np.fft.irfft(spec, n)


def place_speech(rng: np.random.Generator, word: np.ndarray, n: int) -> np.ndarray:
    """A clip of ``n`` samples holding ``word`` at a random offset (cropped around its centre
    when longer than the clip)."""
    if word.shape[0] > n:  # crop long words around their centre
        start = (word.shape[0] - n) // 2
        word = word[start:start + n]
    offset = int(rng.integers(0, n - word.shape[0] + 1))
    x = np.zeros(n)
    x[offset:offset + word.shape[0]] = word
    return x


def quantize(x: np.ndarray) -> np.ndarray:
    """Float samples (full scale 1.0) -> int16, rounded and clipped."""
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def finish(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Add low-level noise, peak-normalise to a random level, quantise to int16."""
    peak = np.max(np.abs(x))
    if peak <= 0:
        raise RuntimeError("generated an all-zero clip")
    x = x / peak
    noise_rms = 10.0 ** (-rng.uniform(*NOISE_DB_BELOW_PEAK) / 20.0)
    x = x + noise_rms * rng.standard_normal(x.shape[0])
    x = x / np.max(np.abs(x)) * rng.uniform(*PEAK_LEVEL_RANGE)
    return quantize(x)
