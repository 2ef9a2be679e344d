"""The built-in demo audio set (examples/prepare/make_demo_data.py) and its eSpeak NG speech.

The speech comes from mam_clap_fixtures.speech."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mam_clap_fixtures import speech

from .conftest import load_script

pytest.importorskip("espeakng_loader")
sf = pytest.importorskip("soundfile")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "prepare" / "make_demo_data.py"
CLIPS = 3
CLASSES = ["yes", "no", "up", "down", "tone", "chirp", "clicks", "noise_burst"]
SPEECH = CLASSES[:4]


mdd = load_script("examples/prepare/make_demo_data.py", "make_demo_data_under_test")


def _hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _read_tsv(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = [line.split("\t") for line in lines[1:]]
    return lines[0], [e[0] for e in entries], [int(e[1]) for e in entries]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "a"
    summary = mdd.make_demo_data(out, clips_per_class=CLIPS, seed=0, progress=False)
    return out, summary


def test_layout_and_counts(demo):
    out, summary = demo
    wavs = sorted(out.glob("audio/*/*.wav"))
    assert len(wavs) == len(CLASSES) * CLIPS
    for name in CLASSES:
        assert sorted(p.name for p in (out / "audio" / name).glob("*.wav")) == [
            f"{name}_{k}.wav" for k in range(CLIPS)
        ]
    assert (out / "classes.txt").read_text(encoding="utf-8").splitlines() == CLASSES
    assert summary["classes"] == CLASSES
    assert summary["out_dir"] == str(out.resolve())
    # stratified: round(0.25 * 3) = 1 valid clip per class
    assert summary["counts"] == {"train": 2 * len(CLASSES), "valid": len(CLASSES)}
    assert summary["per_class"]["valid"] == {name: 1 for name in CLASSES}
    assert len(summary["speech_voices"]) > 1


def test_manifests_labels_and_audio_format(demo):
    out, _ = demo
    seen = []
    for split in ("train", "valid"):
        root, relpaths, sizes = _read_tsv(out / f"{split}.tsv")
        assert root == str((out / "audio").resolve())
        labels = (out / f"{split}.lbl").read_text(encoding="utf-8").splitlines()
        assert len(labels) == len(relpaths) > 0
        for rel, size, label in zip(relpaths, sizes, labels):
            assert label == str(CLASSES.index(rel.split("/")[0]))
            info = sf.info(os.path.join(root, rel))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.frames == size == 16000
        seen += relpaths
    # every clip is in exactly one split
    assert sorted(seen) == sorted(str(p.relative_to(out / "audio")) for p in out.glob("audio/*/*.wav"))


def test_speech_is_audible_and_varied(demo):
    out, _ = demo
    for name in SPEECH:
        clips = [sf.read(str(p), dtype="float64")[0] for p in sorted((out / "audio" / name).glob("*.wav"))]
        for x in clips:
            assert np.sqrt(np.mean(x ** 2)) > 0.01
            assert np.max(np.abs(x)) > 0.25
        assert len({x.tobytes() for x in clips}) == len(clips)

    # the same word with two voices (same rate/pitch) gives different audio
    job = {"text": "yes", "rate": 170, "pitch": 50, "pitch_range": 50, "noise_seed": 1}
    (male, female), sr = speech.synthesize_speech([{**job, "voice": "en+m1"}, {**job, "voice": "en+f2"}])
    assert sr > 0
    for x in (male, female):
        assert x.dtype == np.int16 and np.sqrt(np.mean(x.astype(np.float64) ** 2)) > 300
    n = min(len(male), len(female))
    spec_m = np.abs(np.fft.rfft(male[:n].astype(np.float64)))
    spec_f = np.abs(np.fft.rfft(female[:n].astype(np.float64)))
    assert np.corrcoef(spec_m, spec_f)[0, 1] < 0.95


def test_deterministic(demo, tmp_path):
    out, _ = demo
    reference = _hashes(out)

    # same seed, same directory: every file byte-identical (tsv root lines included)
    again = tmp_path / "again"
    mdd.make_demo_data(again, clips_per_class=CLIPS, seed=0, progress=False)
    first = _hashes(again)
    mdd.make_demo_data(again, clips_per_class=CLIPS, seed=0, progress=False)
    assert _hashes(again) == first

    # same seed elsewhere: identical except the absolute root line of the manifests
    moved = {k: v for k, v in first.items() if not k.endswith(".tsv")}
    assert moved == {k: v for k, v in reference.items() if not k.endswith(".tsv")}
    for split in ("train", "valid"):
        assert _read_tsv(again / f"{split}.tsv")[1:] == _read_tsv(out / f"{split}.tsv")[1:]

    # another seed: different audio
    other = tmp_path / "other"
    mdd.make_demo_data(other, clips_per_class=CLIPS, seed=1, progress=False)
    other_hashes = _hashes(other)
    wavs = [k for k in reference if k.endswith(".wav")]
    assert all(other_hashes[k] != reference[k] for k in wavs)


@pytest.mark.slow
def test_cli_prints_summary(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--clips-per-class", "2", "--seed", "3",
         "--seconds", "0.5", "--valid-percent", "0.5", "--no-progress"],
        capture_output=True, text=True, check=True,
    )
    summary = json.loads(proc.stdout)
    assert summary["counts"] == {"train": len(CLASSES), "valid": len(CLASSES)}
    assert summary["num_samples"] == 8000
    _, _, sizes = _read_tsv(out / "train.tsv")
    assert sizes == [8000] * len(CLASSES)


def test_clear_errors():
    with pytest.raises(RuntimeError, match="no_such_libespeak"):
        speech.ESpeakEngine(library_path="/nonexistent/no_such_libespeak.so", data_path="/nonexistent")
    with pytest.raises(RuntimeError, match="no-such-voice"):
        speech.synthesize_speech([{"text": "yes", "voice": "no-such-voice"}])
