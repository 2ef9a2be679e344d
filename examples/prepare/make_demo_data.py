#!/usr/bin/env python
"""Generate the small, deterministic, labelled demo audio set used by ``make demo`` and tests.

Eight classes, ``clips_per_class`` clips each, 16 kHz mono PCM_16, every clip exactly
``seconds`` long:

* ``yes``, ``no``, ``up``, ``down``: spoken words synthesised with eSpeak NG
  (:mod:`mam_clap_fixtures.speech`: the library of the ``espeakng-loader`` wheel, no system
  ``espeak-ng`` needed).  Voice, rate, pitch and pitch range vary per clip; the word sits
  at a random offset on top of low-level noise.
* ``tone``, ``chirp``, ``clicks``, ``noise_burst``: synthesised with numpy.

Outputs in ``OUT_DIR``::

    audio/<class>/<class>_<k>.wav
    train.tsv, valid.tsv    fairseq wav2vec manifests (root line, then ``relpath<TAB>num_samples``)
    train.lbl, valid.lbl    one line per manifest entry: comma-separated class ids (one id here)
    classes.txt             one class name per line, id = 0-based line index

The same arguments give byte-identical files (:mod:`mam_clap_fixtures.speech` says how
the speech is made reproducible).

Usage::

    python examples/prepare/make_demo_data.py OUT_DIR [--clips-per-class N] [--seed S]
        [--seconds 1.0] [--valid-percent 0.25]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mam_clap_fixtures.signals import bandpass_noise, finish, place_speech
from mam_clap_fixtures.speech import ESPEAK_LANGUAGES, ESPEAK_VARIANTS, SAMPLE_RATE, espeak_job, render_words
from mam_clap_plugin.data.audio import write_wav
from mam_clap_plugin.data.manifest import write_class_list, write_labels, write_manifest

SPEECH_CLASSES = ("yes", "no", "up", "down")
SOUND_CLASSES = ("tone", "chirp", "clicks", "noise_burst")
CLASSES = SPEECH_CLASSES + SOUND_CLASSES


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


def _make_noise_burst(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    x = np.zeros(n)
    for _ in range(int(rng.integers(1, 5))):
        length = min(int(rng.uniform(0.05, 0.25) * sr), n)
        center = _loguniform(rng, 300.0, 5000.0)
        half_bw = 2.0 ** (rng.uniform(0.25, 1.0) / 2.0)  # 1/4 .. 1 octave
        burst = bandpass_noise(rng, length, sr, center / half_bw, min(center * half_bw, 0.49 * sr))
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
                x = place_speech(rng, speech_by_key[(c, k)], n)
            else:
                x = _SOUND_MAKERS[name](rng, n, SAMPLE_RATE)
            samples = finish(rng, x)
            rel = f"{name}/{name}_{k}.wav"
            write_wav(audio_root / rel, samples, SAMPLE_RATE)
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
