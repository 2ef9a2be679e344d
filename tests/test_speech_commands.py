"""The Speech Commands converter (examples/prepare/speech_commands.py) on a generated archive.

SPC-2 (35 words) and SPC-1 (SUPERB's 12 classes) manifests and labels from the official
validation / test lists, on a generated miniature archive."""
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from mam_clap_plugin.data.manifest import read_class_list, read_labels, read_manifest
from mam_clap_plugin.data.speech_commands import SPC2_WORDS

from .conftest import REPO

SCRIPT = os.path.join(REPO, "examples", "prepare", "speech_commands.py")
pytestmark = pytest.mark.slow  # every test runs the converter in a subprocess


def write_archive(root, words, per_word=3):
    """Word folders with per_word 0.1 s clips; the 2nd of each word is valid, the 3rd test; 2.5 s of noise."""
    valid, test = [], []
    for w in words:
        os.makedirs(os.path.join(root, w))
        for i in range(per_word):
            name = f"{w}/spk{i}_nohash_0.wav"
            sf.write(os.path.join(root, name), np.zeros(1600, np.float32), 16000)
            (valid if i == 1 else test if i == 2 else []).append(name)
    open(os.path.join(root, "validation_list.txt"), "w").write("\n".join(valid) + "\n")
    open(os.path.join(root, "testing_list.txt"), "w").write("\n".join(test) + "\n")
    os.makedirs(os.path.join(root, "_background_noise_"))
    sf.write(os.path.join(root, "_background_noise_", "white.wav"), np.zeros(40000, np.float32), 16000)


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], check=True, capture_output=True, text=True)


def read_split(out, split):
    names = read_class_list(os.path.join(out, "classes.txt"))
    manifest = read_manifest(os.path.join(out, f"{split}.tsv"))
    labels = read_labels(os.path.join(out, f"{split}.lbl"), len(manifest), len(names))
    return names, [(manifest.full_path(i), names[lbl[0]]) for i, lbl in enumerate(labels)]


def test_spc2_uses_every_word_and_the_official_lists(tmp_path):
    words = list(SPC2_WORDS)
    write_archive(tmp_path / "sc", words)
    run(tmp_path / "sc", tmp_path / "out", "--version", "2")
    names, train = read_split(tmp_path / "out", "train")
    assert names == words and len(train) == 35
    _, valid = read_split(tmp_path / "out", "valid")
    assert all("spk1_" in p and os.path.isfile(p) and os.path.basename(os.path.dirname(p)) == c for p, c in valid)
    _, test = read_split(tmp_path / "out", "test")
    assert len(test) == 35 and all("spk2_" in p for p, _ in test)


def test_spc1_superb_classes_silence_and_test_archive(tmp_path):
    words = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "bed", "cat"]
    write_archive(tmp_path / "sc", words)
    test_root = tmp_path / "test_set"
    for c in words[:10] + ["_unknown_", "_silence_"]:
        os.makedirs(test_root / c)
        sf.write(test_root / c / "a.wav", np.zeros(16000, np.float32), 16000)
    run(tmp_path / "sc", tmp_path / "out", "--version", "1", "--test-root", test_root)
    names, train = read_split(tmp_path / "out", "train")
    assert names == words[:10] + ["_unknown_", "_silence_"]
    by_class = {c: [p for p, k in train if k == c] for c in names}
    assert len(by_class["_unknown_"]) == 2  # bed and cat, first clip each
    assert all(sf.info(p).frames == 16000 for p in by_class["_silence_"])  # 1 s noise pieces
    _, valid = read_split(tmp_path / "out", "valid")
    assert sum(c == "_silence_" for _, c in valid) == 1 and len(by_class["_silence_"]) == 1
    _, test = read_split(tmp_path / "out", "test")
    assert len(test) == 12 and all(str(test_root) in p for p, _ in test)
