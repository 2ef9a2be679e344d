"""Spoken words from eSpeak NG, reproducible byte for byte (demo and test fixture).

The library is the one bundled in the ``espeakng-loader`` wheel, driven through ``ctypes``
(no system ``espeak-ng`` needed). Two things in libespeak-ng work against reproducibility:
``espeak_Initialize`` seeds its noise generator (breathy voices) from the wall clock, so
every clip reseeds it with ``espeak_ng_SetRandSeed``; and the library keeps hidden static
state between syntheses (e.g. the pitch-flutter phase of its wave generator) that neither
``espeak_Initialize`` nor ``espeak_Terminate`` resets, so a second run in the same process
would sound slightly different. All speech is therefore synthesised in a fresh worker
process (this file run with ``--espeak-worker``) that initialises eSpeak once and renders
the clips in a fixed order: :func:`synthesize_speech` depends only on its jobs.

The worker runs this file by path and imports nothing of this package (only the standard
library and numpy), whichever way the parent found it.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

#: Sample rate of the words :func:`render_words` returns (the demo sets' rate).
SAMPLE_RATE = 16000

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

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4
_EE_OK = 0

_WORKER_FLAG = "--espeak-worker"


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


# --------------------------------------------------------------------------- rendering


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Worker command line: ``speech.py --espeak-worker OUT.npz < jobs.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != _WORKER_FLAG:
        print(f"usage: {_WORKER_FLAG} OUT.npz < jobs.json", file=sys.stderr)
        return 2
    try:
        return _worker_main(argv[1])
    except RuntimeError as exc:  # reported by the parent; no traceback needed
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
