#!/usr/bin/env python
"""Generate the small, deterministic, labelled demo audio set used by ``make demo`` and tests.

Eight classes, ``clips_per_class`` clips each, 16 kHz mono PCM_16, every clip exactly
``seconds`` long:

* ``yes``, ``no``, ``up``, ``down``: spoken words synthesised with eSpeak NG.  The library
  is the one bundled in the ``espeakng-loader`` wheel and is driven through ``ctypes``
  (no system ``espeak-ng`` needed).  Voice, rate, pitch and pitch range vary per clip;
  the word sits at a random offset on top of low-level noise.
* ``tone``, ``chirp``, ``clicks``, ``noise_burst``: synthesised with numpy.

Outputs in ``OUT_DIR``::

    audio/<class>/<class>_<k>.wav
    train.tsv, valid.tsv    fairseq wav2vec manifests (root line, then ``relpath<TAB>num_samples``)
    train.lbl, valid.lbl    one line per manifest entry: comma-separated class ids (one id here)
    classes.txt             one class name per line, id = 0-based line index

The same arguments give byte-identical files.  Two things in libespeak-ng work against
that: ``espeak_Initialize`` seeds its noise generator (breathy voices) from the wall
clock, so every clip reseeds it with ``espeak_ng_SetRandSeed``; and the library keeps
hidden static state between syntheses (e.g. the pitch-flutter phase of its wave
generator) that neither ``espeak_Initialize`` nor ``espeak_Terminate`` resets, so a
second run in the same process would sound slightly different.  All speech is therefore
synthesised in a fresh worker process (this file run with ``--espeak-worker``) that
initialises eSpeak once and renders the clips in a fixed order.

Usage::

    python examples/prepare/make_demo_data.py OUT_DIR [--clips-per-class N] [--seed S]
        [--seconds 1.0] [--valid-percent 0.25]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from mam_clap_plugin.data.manifest import (  # noqa: E402
    write_class_list,
    write_labels,
    write_manifest,
)

SAMPLE_RATE = 16000
SPEECH_CLASSES = ("yes", "no", "up", "down")
SOUND_CLASSES = ("tone", "chirp", "clicks", "noise_burst")
CLASSES = SPEECH_CLASSES + SOUND_CLASSES

# eSpeak NG voices: an English language voice plus a voice variant ("<lang>+<variant>").
ESPEAK_LANGUAGES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029")
ESPEAK_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "f1", "f2", "f3", "f4", "f5",
    "klatt3", "Andy", "linda", "belinda",
)
ESPEAK_RATE_RANGE = (130, 220)  # words per minute (eSpeak default 175)
ESPEAK_PITCH_RANGE = (25, 75)  # 0-100 (default 50)
ESPEAK_PITCH_VARIATION_RANGE = (30, 80)  # 0-100 (default 50)

PEAK_LEVEL_RANGE = (0.3, 0.9)  # final peak amplitude (about -10.5 .. -0.9 dBFS)
NOISE_DB_BELOW_PEAK = (40.0, 55.0)  # background noise RMS relative to the signal peak

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4
_EE_OK = 0

_WORKER_FLAG = "--espeak-worker"


# --------------------------------------------------------------------------- eSpeak NG


class ESpeakEngine:
    """Minimal ctypes binding of libespeak-ng in synchronous mode.

    Audio arrives through the synth callback as int16 chunks and is collected per call.
    Create at most one per process: :func:`_worker_main` makes the only one.
    """

    _CALLBACK = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
    )

    def __init__(self, library_path: Optional[str] = None, data_path: Optional[str] = None):
        if library_path is None or data_path is None:
            try:
                import espeakng_loader
            except ImportError as exc:
                raise RuntimeError(
                    "the demo speech classes need the 'espeakng-loader' package "
                    "(pip install espeakng-loader)"
                ) from exc
            library_path = library_path or espeakng_loader.get_library_path()
            data_path = data_path or espeakng_loader.get_data_path()
        self.library_path = str(library_path)
        self.data_path = str(data_path)
        try:
            lib = ctypes.CDLL(self.library_path)
        except OSError as exc:
            raise RuntimeError(f"cannot load libespeak-ng from {self.library_path}: {exc}") from exc

        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [self._CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        try:
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
        except AttributeError as exc:
            raise RuntimeError(
                f"{self.library_path} has no espeak_ng_SetRandSeed (eSpeak NG >= 1.51 needed): "
                "its breath noise could not be made reproducible"
            ) from exc
        self._lib = lib
        try:  # a few code paths still use libc rand()
            self._libc_srand = ctypes.CDLL(None).srand
            self._libc_srand.argtypes = [ctypes.c_uint]
            self._libc_srand.restype = None
        except (OSError, AttributeError, TypeError):
            self._libc_srand = None

        # DONT_EXIT: report a missing/broken data dir as an error instead of exit()ing.
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), _ESPEAK_INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise RuntimeError(
                f"espeak_Initialize failed (returned {rate}) for library {self.library_path} "
                f"with data path {self.data_path}"
            )
        self.sample_rate = int(rate)
        self._chunks: List[np.ndarray] = []
        # Keep a reference: the C side only holds a raw function pointer.
        self._callback = self._CALLBACK(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def _check(self, what: str, code: int) -> None:
        if code != _EE_OK:
            raise RuntimeError(f"{what} failed with espeak error {code} (library {self.library_path})")

    def synth(self, text: str, voice: str, rate: int = 175, pitch: int = 50,
              pitch_range: int = 50, noise_seed: int = 1) -> np.ndarray:
        """Synthesise ``text``; returns int16 samples at :attr:`sample_rate`.

        ``noise_seed`` (> 0) seeds eSpeak's random generator (breathy voices), which
        ``espeak_Initialize`` seeds from the wall clock.
        """
        lib = self._lib
        if noise_seed <= 0:
            raise ValueError("noise_seed must be > 0")
        lib.espeak_ng_SetRandSeed(int(noise_seed))
        if self._libc_srand is not None:
            self._libc_srand(int(noise_seed) & 0xFFFFFFFF)
        self._check(f"espeak_SetVoiceByName({voice!r})", lib.espeak_SetVoiceByName(voice.encode()))
        # Parameters after the voice: selecting a voice may reset them.
        self._check("espeak_SetParameter(rate)", lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0))
        self._check("espeak_SetParameter(pitch)", lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0))
        self._check("espeak_SetParameter(range)",
                    lib.espeak_SetParameter(_ESPEAK_RANGE, int(pitch_range), 0))
        self._check("espeak_SetParameter(volume)", lib.espeak_SetParameter(_ESPEAK_VOLUME, 100, 0))
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        self._check(
            f"espeak_Synth({text!r})",
            lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None),
        )
        self._check("espeak_Synchronize", lib.espeak_Synchronize())
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
        self._chunks = []
        if audio.size == 0 or not np.any(audio):
            raise RuntimeError(
                f"eSpeak NG returned no audio for {text!r} with voice {voice!r} "
                f"(library {self.library_path}, data {self.data_path})"
            )
        return audio.astype(np.int16, copy=False)


def _worker_main(out_path: str) -> int:
    """Worker entry: JSON job list on stdin -> ``.npz`` with one int16 array per job."""
    jobs = json.loads(sys.stdin.read())
    engine = ESpeakEngine()
    arrays = {
        f"clip{i}": engine.synth(j["text"], j["voice"], j["rate"], j["pitch"], j["pitch_range"],
                                   j["noise_seed"])
        for i, j in enumerate(jobs)
    }
    np.savez(out_path, sample_rate=np.array(engine.sample_rate), **arrays)
    return 0


def espeak_job(rng: np.random.Generator, text: str, voice: str) -> Dict:
    """Speech job for :func:`synthesize_speech`: ``text`` in ``voice`` at a random rate, pitch
    and pitch range, with a random noise seed (drawn from ``rng`` in that order)."""
    return {
        "text": text, "voice": voice,
        "rate": int(rng.integers(ESPEAK_RATE_RANGE[0], ESPEAK_RATE_RANGE[1] + 1)),
        "pitch": int(rng.integers(ESPEAK_PITCH_RANGE[0], ESPEAK_PITCH_RANGE[1] + 1)),
        "pitch_range": int(rng.integers(ESPEAK_PITCH_VARIATION_RANGE[0],
                                        ESPEAK_PITCH_VARIATION_RANGE[1] + 1)),
        "noise_seed": int(rng.integers(1, 2 ** 31 - 1)),
    }


def synthesize_speech(jobs: Sequence[Dict]) -> Tuple[List[np.ndarray], int]:
    """Render speech jobs (``text, voice, rate, pitch, pitch_range, noise_seed``) in a fresh process.

    Returns the int16 waveforms (one per job, same order) and eSpeak's sample rate.
    The result depends only on ``jobs``, never on what this process synthesised before.
    """
    jobs = [
        {"text": str(j["text"]), "voice": str(j["voice"]), "rate": int(j.get("rate", 175)),
         "pitch": int(j.get("pitch", 50)), "pitch_range": int(j.get("pitch_range", 50)),
         "noise_seed": int(j.get("noise_seed", 1))}
        for j in jobs
    ]
    if not jobs:
        return [], 0
    with tempfile.TemporaryDirectory(prefix="demo_espeak_") as tmp:
        out_path = os.path.join(tmp, "speech.npz")
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), _WORKER_FLAG, out_path],
            input=json.dumps(jobs), capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = (proc.stderr or "").strip().splitlines()[-15:]
            raise RuntimeError(
                "eSpeak NG speech synthesis failed in the worker process "
                f"(exit code {proc.returncode}):\n" + "\n".join(tail)
            )
        with np.load(out_path) as npz:
            sample_rate = int(npz["sample_rate"])
            clips = [npz[f"clip{i}"].astype(np.int16) for i in range(len(jobs))]
    return clips, sample_rate


# --------------------------------------------------------------------------- signals


def _fade(x: np.ndarray, fade_samples: int) -> np.ndarray:
    n = min(fade_samples, x.shape[0] // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
        x = x.copy()
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _make_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f0 = _loguniform(rng, 110.0, 880.0)
    n_harm = int(rng.integers(1, 9))
    rolloff = rng.uniform(0.7, 2.0)
    t = np.arange(n) / sr
    x = np.zeros(n)
    for h in range(1, n_harm + 1):
        if h * f0 >= 0.45 * sr:
            break
        x += h ** -rolloff * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi))
    return _fade(x, int(0.01 * sr))


def _make_chirp(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    length = max(int(n * rng.uniform(0.3, 0.9)), 2)
    f_a, f_b = _loguniform(rng, 150.0, 6000.0), _loguniform(rng, 150.0, 6000.0)
    while abs(np.log(f_b / f_a)) < np.log(2.0):  # at least one octave of sweep
        f_b = _loguniform(rng, 150.0, 6000.0)
    t = np.arange(length) / sr
    dur = length / sr
    if rng.random() < 0.5:  # linear sweep
        phase = 2 * np.pi * (f_a * t + 0.5 * (f_b - f_a) / dur * t ** 2)
    else:  # exponential sweep
        k = np.log(f_b / f_a) / dur
        phase = 2 * np.pi * f_a * (np.exp(k * t) - 1.0) / k
    sweep = np.sin(phase) + rng.uniform(0.0, 0.4) * np.sin(2 * phase)
    sweep = _fade(sweep, int(0.01 * sr))
    start = int(rng.integers(0, n - length + 1))
    x = np.zeros(n)
    x[start:start + length] = sweep
    return x


def _make_clicks(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    rate = rng.uniform(3.0, 25.0)  # clicks per second
    period = sr / rate
    jitter = rng.uniform(0.0, 0.15)
    click_len = int(0.004 * sr)
    decay = np.exp(-np.arange(click_len) / (rng.uniform(0.0003, 0.0012) * sr))
    ring = np.sin(2 * np.pi * rng.uniform(1000.0, 5000.0) * np.arange(click_len) / sr)
    click = decay * (0.6 * ring + 0.4 * (np.arange(click_len) == 0))
    x = np.zeros(n + click_len)
    pos = rng.uniform(0.0, period)
    while pos < n:
        i = int(pos)
        x[i:i + click_len] += click * rng.uniform(0.6, 1.0) * rng.choice((-1.0, 1.0))
        pos += period * (1.0 + jitter * rng.uniform(-1.0, 1.0))
    return x[:n]


def _bandpass_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0.0
    return np.fft.irfft(spec, n)


def _make_noise_burst(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    x = np.zeros(n)
    for _ in range(int(rng.integers(1, 5))):
        length = min(int(rng.uniform(0.05, 0.25) * sr), n)
        center = _loguniform(rng, 300.0, 5000.0)
        half_bw = 2.0 ** (rng.uniform(0.25, 1.0) / 2.0)  # 1/4 .. 1 octave
        burst = _bandpass_noise(rng, length, sr, center / half_bw, min(center * half_bw, 0.49 * sr))
        burst = _fade(burst, int(rng.uniform(0.005, 0.03) * sr))
        burst /= np.max(np.abs(burst)) + 1e-12
        start = int(rng.integers(0, n - length + 1))
        x[start:start + length] += burst * rng.uniform(0.5, 1.0)
    return x


_SOUND_MAKERS = {
    "tone": _make_tone,
    "chirp": _make_chirp,
    "clicks": _make_clicks,
    "noise_burst": _make_noise_burst,
}


def _trim_silence(x: np.ndarray, sr: int, rel_threshold: float = 0.02) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > rel_threshold * np.max(np.abs(x)))
    if loud.size == 0:
        return x
    start = max(int(loud[0]) - int(0.01 * sr), 0)
    end = min(int(loud[-1]) + int(0.02 * sr), x.shape[0])
    return x[start:end]


def _resample_batch(clips: Sequence[np.ndarray], orig_sr: int, new_sr: int) -> List[np.ndarray]:
    """Resample 1-D float clips with one ``torchaudio.functional.resample`` call.

    The clips are zero-padded to a common length; the sinc kernel is finite, so each
    output, cut to its own length, equals resampling that clip on its own.
    """
    if not clips or orig_sr == new_sr:
        return [np.asarray(c, dtype=np.float64) for c in clips]
    import torch
    import torchaudio.functional as AF

    longest = max(c.shape[0] for c in clips)
    batch = np.zeros((len(clips), longest), dtype=np.float64)
    for i, c in enumerate(clips):
        batch[i, :c.shape[0]] = c
    # float64 keeps the result independent of CPU kernel choices (byte-identical output).
    out = AF.resample(torch.from_numpy(batch), orig_sr, new_sr).numpy()
    return [out[i, :int(np.ceil(c.shape[0] * new_sr / orig_sr))].copy() for i, c in enumerate(clips)]


def render_words(jobs: Sequence[Dict]) -> List[np.ndarray]:
    """Synthesise speech jobs (:func:`synthesize_speech`); returns one float waveform per job
    (int16 full scale = 1.0), trimmed of leading/trailing silence, at :data:`SAMPLE_RATE`."""
    speech, espeak_sr = synthesize_speech(jobs)
    words = [_trim_silence(w.astype(np.float64) / 32768.0, espeak_sr) for w in speech]
    return _resample_batch(words, espeak_sr, SAMPLE_RATE)


def _place_speech(rng: np.random.Generator, word: np.ndarray, n: int) -> np.ndarray:
    if word.shape[0] > n:  # crop long words around their centre
        start = (word.shape[0] - n) // 2
        word = word[start:start + n]
    offset = int(rng.integers(0, n - word.shape[0] + 1))
    x = np.zeros(n)
    x[offset:offset + word.shape[0]] = word
    return x


def _quantize(x: np.ndarray) -> np.ndarray:
    """Float samples (full scale 1.0) -> int16, rounded and clipped."""
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def _finish(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Add low-level noise, peak-normalise to a random level, quantise to int16."""
    peak = np.max(np.abs(x))
    if peak <= 0:
        raise RuntimeError("generated an all-zero clip")
    x = x / peak
    noise_rms = 10.0 ** (-rng.uniform(*NOISE_DB_BELOW_PEAK) / 20.0)
    x = x + noise_rms * rng.standard_normal(x.shape[0])
    x = x / np.max(np.abs(x)) * rng.uniform(*PEAK_LEVEL_RANGE)
    return _quantize(x)


# --------------------------------------------------------------------------- writers


def _write_wav(path: Path, samples: np.ndarray, sr: int) -> None:
    import soundfile as sf

    sf.write(str(path), samples, sr, subtype="PCM_16", format="WAV")


# --------------------------------------------------------------------------- main API


def _split_valid(seed: int, class_idx: int, n: int, valid_fraction: float) -> set:
    n_valid = int(round(valid_fraction * n))
    if valid_fraction > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    else:
        n_valid = 0
    rng = np.random.default_rng([seed, 2, class_idx])
    return set(int(i) for i in rng.permutation(n)[:n_valid])


def make_demo_data(out_dir, clips_per_class: int = 12, seconds: float = 1.0, seed: int = 0,
                   valid_fraction: float = 0.25, progress: bool = True) -> dict:
    """Write the demo set to ``out_dir`` (see module docstring); returns a summary dict."""
    from tqdm import tqdm

    if clips_per_class < 1:
        raise ValueError("clips_per_class must be >= 1")
    if not seconds > 0:
        raise ValueError("seconds must be > 0")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError("valid_fraction must be in [0, 1)")
    if int(seed) < 0:
        raise ValueError("seed must be >= 0")
    seed = int(seed)
    n = int(round(seconds * SAMPLE_RATE))

    out_dir = Path(out_dir).resolve()
    audio_root = out_dir / "audio"

    # One RNG per clip: its random choices depend only on (seed, class, index).
    rngs = {(c, k): np.random.default_rng([seed, 1, c, k])
            for c in range(len(CLASSES)) for k in range(clips_per_class)}

    speech_keys, jobs = [], []
    for c, name in enumerate(CLASSES):
        if name not in SPEECH_CLASSES:
            continue
        for k in range(clips_per_class):
            rng = rngs[(c, k)]
            voice = (f"{ESPEAK_LANGUAGES[int(rng.integers(len(ESPEAK_LANGUAGES)))]}"
                     f"+{ESPEAK_VARIANTS[int(rng.integers(len(ESPEAK_VARIANTS)))]}")
            jobs.append(espeak_job(rng, name, voice))
            speech_keys.append((c, k))
    speech_by_key = dict(zip(speech_keys, render_words(jobs)))

    for name in CLASSES:
        class_dir = audio_root / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for stale in class_dir.glob(f"{name}_*.wav"):  # leftovers of a larger earlier run
            stale.unlink()

    splits = {"train": ([], [], []), "valid": ([], [], [])}  # relpaths, sizes, labels
    bar = tqdm(total=len(CLASSES) * clips_per_class, desc="demo clips", unit="clip",
               disable=not progress)
    for c, name in enumerate(CLASSES):
        valid_idx = _split_valid(seed, c, clips_per_class, valid_fraction)
        for k in range(clips_per_class):
            rng = rngs[(c, k)]
            if name in SPEECH_CLASSES:
                x = _place_speech(rng, speech_by_key[(c, k)], n)
            else:
                x = _SOUND_MAKERS[name](rng, n, SAMPLE_RATE)
            samples = _finish(rng, x)
            rel = f"{name}/{name}_{k}.wav"
            _write_wav(audio_root / rel, samples, SAMPLE_RATE)
            relpaths, sizes, labels = splits["valid" if k in valid_idx else "train"]
            relpaths.append(rel)
            sizes.append(int(samples.shape[0]))
            labels.append([c])
            bar.update(1)
    bar.close()

    for split, (relpaths, sizes, labels) in splits.items():
        write_manifest(str(out_dir / f"{split}.tsv"), str(audio_root), relpaths, sizes)
        write_labels(str(out_dir / f"{split}.lbl"), labels)
    write_class_list(str(out_dir / "classes.txt"), list(CLASSES))

    return {
        "out_dir": str(out_dir),
        "root": str(audio_root),
        "classes": list(CLASSES),
        "sample_rate": SAMPLE_RATE,
        "seconds": float(seconds),
        "num_samples": n,
        "seed": seed,
        "clips_per_class": clips_per_class,
        "counts": {split: len(v[0]) for split, v in splits.items()},
        "per_class": {
            split: {name: sum(lab[0] == c for lab in v[2]) for c, name in enumerate(CLASSES)}
            for split, v in splits.items()
        },
        "speech_voices": sorted({j["voice"] for j in jobs}),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [_WORKER_FLAG]:
        if len(argv) != 2:
            print(f"usage: {_WORKER_FLAG} OUT.npz < jobs.json", file=sys.stderr)
            return 2
        try:
            return _worker_main(argv[1])
        except RuntimeError as exc:  # reported by the parent; no traceback needed
            print(f"error: {exc}", file=sys.stderr)
            return 1

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--clips-per-class", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=1.0, help="clip length in seconds")
    parser.add_argument("--valid-percent", type=float, default=0.25,
                        help="fraction (0..1) of each class held out for valid.tsv "
                             "(a fraction, like fairseq's wav2vec_manifest.py)")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    args = parser.parse_args(argv)
    summary = make_demo_data(args.out_dir, clips_per_class=args.clips_per_class,
                             seconds=args.seconds, seed=args.seed,
                             valid_fraction=args.valid_percent, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
