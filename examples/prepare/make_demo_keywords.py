#!/usr/bin/env python
"""Generate a small Speech-Commands-like keyword set in the layout s3prl's SUPERB KS task reads.

Offline and deterministic for a seed (same arguments, same bytes).  Words are spoken by
eSpeak NG voices (:mod:`mam_clap_fixtures.speech`, the library of the ``espeakng-loader``
wheel, as for ``make_demo_data.py``); noise is synthesised with numpy.

Every eSpeak voice (``<language>+<variant>``) is one "speaker" and names its files
``<language>_<variant>_nohash_<k>.wav``.  s3prl splits the train root into train and
dev by the SHA-1 of the name before ``_nohash_`` (about 10 % of the speakers go to dev,
another 10 % are dropped); the speakers that s3prl would drop here speak the test root
instead, so the three sets have disjoint speakers.  ``OUT_DIR``::

    train/<word>/<speaker>_nohash_<k>.wav       the 10 keywords and 8 auxiliary words
    train/_background_noise_/<kind>.wav         6 noise recordings (>= 1 s; s3prl crops 1 s)
    test/<keyword>/<speaker>_nohash_<k>.wav     the 10 keywords
    test/_unknown_/<word>_<speaker>_nohash_<k>.wav
    test/_silence_/<kind>_<j>_nohash_0.wav      1 s noise clips at random levels
    keywords.json                               the summary that is also printed

Use ``-o config.downstream_expert.datarc.speech_commands_root=OUT_DIR/train,,
config.downstream_expert.datarc.speech_commands_test_root=OUT_DIR/test`` with
``upstream/run_downstream.py``.

Usage::

    python examples/prepare/make_demo_keywords.py OUT_DIR [--seed 0] [--voices 80]
        [--clips-per-word 1] [--noise-seconds 10]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from mam_clap_fixtures.signals import bandpass_noise, finish, place_speech, quantize
from mam_clap_fixtures.speech import ESPEAK_LANGUAGES, ESPEAK_VARIANTS, SAMPLE_RATE, espeak_job, render_words
from mam_clap_plugin.data.audio import write_wav
from mam_clap_plugin.data.speech_commands import KEYWORDS, s3prl_bucket

#: Auxiliary words of Speech Commands v0.01 used here; s3prl maps them to ``_unknown_``.
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "tree", "wow")
WORDS = KEYWORDS + UNKNOWN_WORDS
NOISE_KINDS = ("white_noise", "pink_noise", "brown_noise", "hum", "running_tap", "fan")
SUMMARY = "keywords.json"


def all_speakers() -> List[dict]:
    """Every eSpeak voice as a speaker, with its index (for the RNG) and s3prl bucket."""
    out = []
    for lang in ESPEAK_LANGUAGES:
        for variant in ESPEAK_VARIANTS:
            sid = f"{lang}_{variant}"
            out.append({"index": len(out), "id": sid, "voice": f"{lang}+{variant}",
                        "bucket": s3prl_bucket(f"{sid}_nohash_0.wav")})
    return out


def pick_speakers(count: int) -> List[dict]:
    """The first ``count`` speakers of a fixed order that starts with one dev and one test
    speaker, so any ``count >= 3`` has non-empty train, dev and test sets."""
    speakers = all_speakers()
    if not 3 <= count <= len(speakers):
        raise ValueError(f"--voices must be in 3..{len(speakers)}")
    first = [next(s for s in speakers if s["bucket"] == b) for b in ("dev", "test")]
    order = first + [s for s in speakers if s not in first]
    return order[:count]


# --------------------------------------------------------------------------- noise


def _shaped_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1 / f**exponent (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    f[0] = f[1]
    spec *= f ** (-exponent / 2.0)
    spec[f < 20.0] = 0.0
    return np.fft.irfft(spec, n)


def make_noise(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """One float noise signal of ``n`` samples, peak 1."""
    t = np.arange(n) / SAMPLE_RATE
    if kind == "white_noise":
        x = rng.standard_normal(n)
    elif kind == "pink_noise":
        x = _shaped_noise(rng, n, 1.0)
    elif kind == "brown_noise":
        x = _shaped_noise(rng, n, 2.0)
    elif kind == "hum":
        f0 = rng.choice((50.0, 60.0)) * rng.uniform(0.98, 1.02)
        x = sum(h ** -1.0 * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi)) for h in range(1, 8))
        x = x + 0.05 * _shaped_noise(rng, n, 1.0) / (np.std(_shaped_noise(rng, n, 1.0)) + 1e-12)
    elif kind == "running_tap":
        x = bandpass_noise(rng, n, SAMPLE_RATE, rng.uniform(600, 1500), rng.uniform(4000, 7000))
        wobble = bandpass_noise(rng, n, SAMPLE_RATE, 1.0, 12.0)  # slow level changes
        x = x * (0.6 + 0.4 * wobble / (np.max(np.abs(wobble)) + 1e-12))
    elif kind == "fan":
        blade = rng.uniform(20.0, 60.0)
        x = bandpass_noise(rng, n, SAMPLE_RATE, 30.0, rng.uniform(300, 900))
        x = x / (np.std(x) + 1e-12) * (1.0 + 0.3 * np.sin(2 * np.pi * blade * t))
        x = x + 0.3 * np.sin(2 * np.pi * blade * 3 * t)
    else:
        raise ValueError(f"unknown noise kind {kind!r}")
    return x / (np.max(np.abs(x)) + 1e-12)


def _to_int16(x: np.ndarray, peak: float) -> np.ndarray:
    return quantize(x / (np.max(np.abs(x)) + 1e-12) * peak)


# --------------------------------------------------------------------------- main API


def _clip_job(seed: int, spk: dict, word: str, k: int):
    """Synthesis job and RNG of clip ``k`` of ``word`` by ``spk``; depends on those only."""
    rng = np.random.default_rng([seed, 7, spk["index"], WORDS.index(word), k])
    return espeak_job(rng, word, spk["voice"]), rng


def _word_clip(rng: np.random.Generator, word: np.ndarray, n: int) -> np.ndarray:
    x = place_speech(rng, word, n)
    if rng.random() < 0.5:  # half of the clips over a noise floor at 10..35 dB SNR
        kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
        noise = make_noise(kind, rng, n)
        snr_db = rng.uniform(10.0, 35.0)
        speech_rms = np.sqrt(np.mean(word ** 2)) + 1e-12
        x = x + noise / (np.sqrt(np.mean(noise ** 2)) + 1e-12) * speech_rms * 10 ** (-snr_db / 20.0)
    return finish(rng, x)


def _prepare_out(out_dir: Path) -> None:
    """Remove the train/test roots of an earlier run; refuse to touch anything else."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = (out_dir / SUMMARY).exists()
    for sub in ("train", "test"):
        path = out_dir / sub
        if path.exists():
            if not ours:
                raise FileExistsError(f"{path} exists and {out_dir / SUMMARY} does not: not a directory "
                                      "written by make_demo_keywords.py; choose an empty OUT_DIR")
            shutil.rmtree(path)


def make_demo_keywords(out_dir, seed: int = 0, voices: int = 80, clips_per_word: int = 1,
                       noise_seconds: float = 10.0, seconds: float = 1.0, progress: bool = True) -> dict:
    """Write the keyword set (see module docstring); returns the summary dict."""
    from tqdm import tqdm

    if int(seed) < 0:
        raise ValueError("seed must be >= 0")
    if clips_per_word < 1:
        raise ValueError("clips_per_word must be >= 1")
    if noise_seconds < 1.0:
        raise ValueError("noise_seconds must be >= 1 (s3prl crops 1 s of each noise file)")
    seed = int(seed)
    n = int(round(seconds * SAMPLE_RATE))
    speakers = pick_speakers(voices)
    by_bucket = {b: [s for s in speakers if s["bucket"] == b] for b in ("train", "dev", "test")}
    out_dir = Path(out_dir).resolve()
    _prepare_out(out_dir)
    train_root, test_root = out_dir / "train", out_dir / "test"

    # Train root: train and dev speakers say every word; test speakers: keywords + one
    # auxiliary word per clip slot (so _unknown_ is as large as each keyword class).
    plan = []  # (speaker, word, k, relative path)
    for spk in by_bucket["train"] + by_bucket["dev"]:
        for word in WORDS:
            for k in range(clips_per_word):
                plan.append((spk, word, k, f"train/{word}/{spk['id']}_nohash_{k}.wav"))
    for spk in by_bucket["test"]:
        for word in KEYWORDS:
            for k in range(clips_per_word):
                plan.append((spk, word, k, f"test/{word}/{spk['id']}_nohash_{k}.wav"))
        for k in range(clips_per_word):
            word = UNKNOWN_WORDS[(spk["index"] * clips_per_word + k) % len(UNKNOWN_WORDS)]
            plan.append((spk, word, k, f"test/_unknown_/{word}_{spk['id']}_nohash_{k}.wav"))
    plan.sort(key=lambda p: (p[0]["index"], WORDS.index(p[1]), p[2]))

    jobs, rngs = zip(*(_clip_job(seed, spk, word, k) for spk, word, k, _ in plan))
    words = render_words(jobs)

    bar = tqdm(total=len(plan), desc="keyword clips", unit="clip", disable=not progress)
    for (*_, rel), rng, w in zip(plan, rngs, words):
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(path, _word_clip(rng, w, n), SAMPLE_RATE)
        bar.update(1)
    bar.close()

    # _background_noise_: one longer recording per noise kind (s3prl's train/dev _silence_).
    noise_dir = train_root / "_background_noise_"
    noise_dir.mkdir(parents=True, exist_ok=True)
    n_noise = int(round(noise_seconds * SAMPLE_RATE))
    for i, kind in enumerate(NOISE_KINDS):
        rng = np.random.default_rng([seed, 8, i])
        write_wav(noise_dir / f"{kind}.wav", _to_int16(make_noise(kind, rng, n_noise), rng.uniform(0.1, 0.6)),
                   SAMPLE_RATE)
    # test/_silence_: fresh 1 s noise clips, as many as a keyword class has clips.
    silence_dir = test_root / "_silence_"
    silence_dir.mkdir(parents=True, exist_ok=True)
    n_silence = len(by_bucket["test"]) * clips_per_word
    for j in range(n_silence):
        rng = np.random.default_rng([seed, 9, j])
        kind = NOISE_KINDS[j % len(NOISE_KINDS)]
        peak = 10 ** rng.uniform(-3.0, np.log10(0.5))  # -60 .. -6 dBFS, from near silence to loud
        write_wav(silence_dir / f"{kind}_{j}_nohash_0.wav", _to_int16(make_noise(kind, rng, n), peak),
                   SAMPLE_RATE)

    folder_counts = {
        root.name: {d.name: len(list(d.glob("*.wav"))) for d in sorted(root.iterdir()) if d.is_dir()}
        for root in (train_root, test_root)
    }
    n_words = clips_per_word * len(WORDS)
    summary = {
        "out_dir": str(out_dir),
        "speech_commands_root": str(train_root),
        "speech_commands_test_root": str(test_root),
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
        "seconds": float(seconds),
        "clips_per_word": clips_per_word,
        "keywords": list(KEYWORDS),
        "unknown_words": list(UNKNOWN_WORDS),
        "speakers": {b: [s["id"] for s in v] for b, v in by_bucket.items()},
        # as s3prl counts them: the noise files are _silence_ items of both train and dev
        "s3prl_sizes": {
            "train": len(by_bucket["train"]) * n_words + len(NOISE_KINDS),
            "dev": len(by_bucket["dev"]) * n_words + len(NOISE_KINDS),
            "test": sum(folder_counts["test"].values()),
        },
        "folders": folder_counts,
    }
    with open(out_dir / SUMMARY, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="output directory (gets train/, test/ and keywords.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voices", type=int, default=len(ESPEAK_LANGUAGES) * len(ESPEAK_VARIANTS),
                   help="number of eSpeak voices (speakers), 3..80; about 80%% train, 10%% dev, 10%% test")
    p.add_argument("--clips-per-word", type=int, default=1, help="clips per speaker and word")
    p.add_argument("--noise-seconds", type=float, default=10.0, help="length of each _background_noise_ file")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    args = p.parse_args(argv)
    summary = make_demo_keywords(args.out_dir, seed=args.seed, voices=args.voices,
                                 clips_per_word=args.clips_per_word, noise_seconds=args.noise_seconds,
                                 progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
