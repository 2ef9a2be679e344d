"""Run the examples/prepare CLIs (manifest, labels, norm_stats) on tiny generated folders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mam_clap_plugin.data.manifest import read_class_list, read_labels, read_manifest, write_manifest

from .conftest import load_script
from .references import kaldi_fbank

REPO = Path(__file__).resolve().parents[1]
PREPARE = REPO / "examples" / "prepare"


def run(script, *args, check=True, cwd=None):
    """Run a prepare script as a user does (the installed package, no PYTHONPATH added);
    returns the CompletedProcess (text output)."""
    proc = subprocess.run([sys.executable, str(PREPARE / script), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def write_wav(path, samples, rate=16000, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).uniform(-0.5, 0.5, samples).astype(np.float32)
    soundfile.write(path, data, rate)


def write_tsv(path, root, names):
    write_manifest(str(path), str(root), names, [1600] * len(names))


@pytest.mark.slow
def test_manifest_cli(tmp_path):
    root = tmp_path / "audio"
    write_wav(root / "b" / "y.wav", 1600)
    write_wav(root / "a" / "x.flac", 3200)
    write_wav(root / "c.WAV", 800)
    write_wav(root / "skip.ogg", 800)
    (root / "broken.wav").write_bytes(b"not audio at all" * 20)
    (root / "notes.txt").write_text("ignored")
    proc = run("manifest.py", root, "--dest", tmp_path / "m0", "--valid-percent", 0)
    assert "skipped 1 unreadable or empty file" in proc.stderr and "broken.wav" in proc.stderr
    train = read_manifest(str(tmp_path / "m0" / "train.tsv"))
    assert train.root == os.path.realpath(root)
    assert train.paths == ["a/x.flac", "b/y.wav", "c.WAV"] and train.sizes.tolist() == [3200, 1600, 800]
    assert not (tmp_path / "m0" / "valid.tsv").exists()

    for dest in ("m1", "m2"):
        run("manifest.py", root, "--dest", tmp_path / dest, "--valid-percent", 0.3, "--seed", 3,
            "--train-name", "tr", "--valid-name", "dev")
    tr = read_manifest(str(tmp_path / "m1" / "tr.tsv"))
    dev = read_manifest(str(tmp_path / "m1" / "dev.tsv"))
    assert len(tr) == 2 and len(dev) == 1
    assert sorted(tr.paths + dev.paths) == ["a/x.flac", "b/y.wav", "c.WAV"]
    assert tr.paths == sorted(tr.paths)
    assert (tmp_path / "m1" / "dev.tsv").read_text() == (tmp_path / "m2" / "dev.tsv").read_text()


def write_audioset_meta(tmp_path):
    (tmp_path / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n'
        '2,/m/0jbk,"Animal"\n')
    (tmp_path / "seg.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--4gqARaEJE, 0.000, 10.000, "/m/09x0r,/m/0jbk"\n'
        'abc, 30.000, 40.000, "/m/05zppz"\n')
    (tmp_path / "seg2.csv").write_text('Yxyz, 0.000, 10.000, "/m/0jbk"\n')


@pytest.mark.slow
def test_labels_audioset(tmp_path):
    write_audioset_meta(tmp_path)
    names = ["Y--4gqARaEJE.wav", "sub/abc.wav", "Yxyz.wav"]  # Yxyz is itself the YTID
    write_tsv(tmp_path / "train.tsv", tmp_path, names)
    common = ["--class-index", tmp_path / "class_labels_indices.csv", "--out-dir", tmp_path / "out"]
    run("labels.py", "audioset", tmp_path / "train.tsv", "--segments", tmp_path / "seg.csv",
        tmp_path / "seg2.csv", *common)
    classes = read_class_list(str(tmp_path / "out" / "classes.txt"))
    assert classes == ["Speech", "Male speech, man speaking", "Animal"]
    assert read_labels(str(tmp_path / "out" / "train.lbl"), 3, 3) == [[0, 2], [1], [2]]


@pytest.mark.slow
def test_labels_audioset_unlabelled(tmp_path):
    write_audioset_meta(tmp_path)
    write_tsv(tmp_path / "train.tsv", tmp_path, ["abc.wav", "nolabel.wav", "other.wav"])
    common = ["--segments", tmp_path / "seg.csv", "--class-index", tmp_path / "class_labels_indices.csv"]
    proc = run("labels.py", "audioset", tmp_path / "train.tsv", *common, "--out-dir", tmp_path / "out",
               check=False)
    assert proc.returncode != 0
    assert f"{tmp_path / 'train.tsv'}:3: no label for nolabel.wav (2 of 3 entries unlabelled" in proc.stderr
    assert not (tmp_path / "out" / "train.lbl").exists()
    run("labels.py", "audioset", tmp_path / "train.tsv", *common, "--out-dir", tmp_path / "out",
        "--drop-unlabelled")
    assert read_manifest(str(tmp_path / "out" / "train.tsv")).paths == ["abc.wav"]
    assert read_labels(str(tmp_path / "out" / "train.lbl"), 1, 3) == [[1]]
    assert len(read_manifest(str(tmp_path / "train.tsv"))) == 3  # another --out-dir: the input stays as it was
    assert not list(tmp_path.rglob("*.unfiltered.tsv"))


@pytest.mark.slow
def test_labels_drop_unlabelled_in_the_manifest_folder(tmp_path):
    """The README's combination: --out-dir is the folder of the input manifest (relative paths)."""
    write_audioset_meta(tmp_path)
    (tmp_path / "manifests").mkdir()
    write_tsv(tmp_path / "manifests" / "train.tsv", tmp_path, ["abc.wav", "nolabel.wav", "Yxyz.wav"])
    original = (tmp_path / "manifests" / "train.tsv").read_text()
    args = ["audioset", "manifests/train.tsv", "--segments", "seg.csv", "seg2.csv",
            "--class-index", "class_labels_indices.csv", "--out-dir", "manifests/", "--drop-unlabelled"]
    proc = run("labels.py", *args, cwd=tmp_path)
    assert "wrote manifests/train.tsv: 2 labelled of 3 entries" in proc.stdout
    filtered = read_manifest(str(tmp_path / "manifests" / "train.tsv"))
    assert filtered.paths == ["abc.wav", "Yxyz.wav"] and filtered.root == str(tmp_path)
    assert read_labels(str(tmp_path / "manifests" / "train.lbl"), 2, 3) == [[1], [2]]
    assert (tmp_path / "manifests" / "train.unfiltered.tsv").read_text() == original
    assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == [
        "classes.txt", "train.lbl", "train.tsv", "train.unfiltered.tsv"]
    # running the same command again changes nothing and keeps the first original
    run("labels.py", *args, cwd=tmp_path)
    assert read_manifest(str(tmp_path / "manifests" / "train.tsv")).paths == ["abc.wav", "Yxyz.wav"]
    assert (tmp_path / "manifests" / "train.unfiltered.tsv").read_text() == original
    # a class-list conflict stops before the manifest is touched
    (tmp_path / "manifests" / "classes.txt").write_text("a\nb\nc\n")
    write_tsv(tmp_path / "manifests" / "train.tsv", tmp_path, ["abc.wav", "nolabel.wav"])
    before = (tmp_path / "manifests" / "train.tsv").read_text()
    proc = run("labels.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "already exists with different classes" in proc.stderr
    assert (tmp_path / "manifests" / "train.tsv").read_text() == before


@pytest.mark.slow
def test_labels_esc50(tmp_path):
    (tmp_path / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
        "1-100038-A-14.wav,1,1,chirping_birds,False,100038,A\n"
        "2-100648-A-0.wav,2,0,dog,True,100648,A\n")
    write_tsv(tmp_path / "valid.tsv", tmp_path, ["audio/2-100648-A-0.wav", "audio/1-100038-A-14.wav"])
    run("labels.py", "esc50", tmp_path / "valid.tsv", "--meta", tmp_path / "esc50.csv",
        "--out-dir", tmp_path / "out")
    assert read_class_list(str(tmp_path / "out" / "classes.txt")) == ["dog", "chirping_birds"]
    assert read_labels(str(tmp_path / "out" / "valid.lbl"), 2, 2) == [[0], [1]]


@pytest.mark.slow
def test_labels_speech_commands(tmp_path):
    names = ["yes/a.wav", "no/b.wav", "_background_noise_/noise.wav", "up/c.wav"]
    write_tsv(tmp_path / "train.tsv", tmp_path, names)
    proc = run("labels.py", "speech_commands", tmp_path / "train.tsv", "--out-dir", tmp_path / "o1",
               check=False)
    assert proc.returncode != 0 and "train.tsv:4: no label for _background_noise_/noise.wav" in proc.stderr
    run("labels.py", "speech_commands", tmp_path / "train.tsv", "--out-dir", tmp_path / "o1",
        "--drop-unlabelled")
    assert read_class_list(str(tmp_path / "o1" / "classes.txt")) == ["no", "up", "yes"]
    assert read_labels(str(tmp_path / "o1" / "train.lbl"), 3, 3) == [[2], [0], [1]]
    run("labels.py", "speech_commands", tmp_path / "train.tsv", "--out-dir", tmp_path / "o2",
        "--classes", "yes,no", "--drop-unlabelled")
    assert read_manifest(str(tmp_path / "o2" / "train.tsv")).paths == ["yes/a.wav", "no/b.wav"]
    assert read_labels(str(tmp_path / "o2" / "train.lbl"), 2, 2) == [[0], [1]]
    proc = run("labels.py", "speech_commands", tmp_path / "train.tsv", "--out-dir", tmp_path / "o2",
               "--drop-unlabelled", check=False)  # classes.txt there has only yes,no
    assert proc.returncode != 0 and "already exists with different classes" in proc.stderr


@pytest.mark.slow
def test_norm_stats(tmp_path):
    """Against a hand computation: numpy's Kaldi fbank (tests/references.py) of each clip's first
    1.295 s, mean-removed, zero-padded to 128 frames, then numpy mean / std over every value."""
    write_wav(tmp_path / "a.wav", 16000, seed=1)  # 1 s: 98 frames of audio + 30 rows of padding
    write_wav(tmp_path / "b.wav", 40000, seed=2)  # 2.5 s: cropped to 128 frames
    write_tsv(tmp_path / "train.tsv", tmp_path, ["a.wav", "b.wav"])
    proc = run("norm_stats.py", tmp_path / "train.tsv", "--target-length", 128)
    first, second = proc.stdout.strip().splitlines()[-2:]
    stats = json.loads(second)
    assert first.startswith("norm_mean=") and " norm_std=" in first
    assert f"task.norm_stats='{stats['norm_mean']:.7g},{stats['norm_std']:.7g}'" in first
    fbanks = []
    for name in ("a.wav", "b.wav"):
        wav = soundfile.read(str(tmp_path / name), dtype="float64")[0][: (127 * 10 + 25) * 16]
        fb = kaldi_fbank(wav - wav.mean())
        fbanks.append(np.concatenate([fb, np.zeros((128 - len(fb), 128))])[:128])
    assert [len(kaldi_fbank(np.zeros(n))) for n in (16000, 20720)] == [98, 128]
    values = np.concatenate(fbanks).ravel()
    assert stats["num_clips"] == 2 and values.size == 2 * 128 * 128
    assert stats["norm_mean"] == pytest.approx(values.mean(), abs=1e-4)
    assert stats["norm_std"] == pytest.approx(values.std(), abs=1e-4)
    # the padding rows are part of the statistics (without them the mean moves far beyond the tolerance)
    assert abs(np.concatenate([fbanks[0][:98], fbanks[1]]).mean() - values.mean()) > 0.05


def test_norm_stats_subset():
    """--max-clips picks a sorted, seeded subset (checked in-process: a torch import costs seconds)."""
    module = load_script("examples/prepare/norm_stats.py")
    subset = module.choose_clips(10, 4, seed=0)
    assert len(subset) == 4 and len(set(subset.tolist())) == 4 and list(subset) == sorted(subset)
    assert subset.tolist() == module.choose_clips(10, 4, seed=0).tolist()
    assert module.choose_clips(3, 5, seed=0).tolist() == [0, 1, 2]


@pytest.mark.slow
def test_docs_labelling_every_split_runs_verbatim(tmp_path):
    """docs/data.md "Labelling every split": the manifest and both labels.py commands as shown, in a
    scratch directory holding a Speech Commands-like folder (4 words, background noise) with
    ``examples/`` linked in. valid takes train's class list; a class valid lacks is a warning."""
    from . import readme

    cmds = [c for c, _ in readme.command_lines(readme.section("### Labelling every split"))]
    assert [c.split()[1] for c in cmds] == ["examples/prepare/manifest.py", "examples/prepare/labels.py",
                                            "examples/prepare/labels.py"]
    root = tmp_path / "speech_commands_v0.02"
    words = ["yes", "no", "up", "down"]
    for w, word in enumerate(words):
        for k in range(6 if word != "up" else 1):  # one "up" clip: the 10% valid split will likely miss it
            write_wav(root / word / f"s{k}_nohash_0.wav", 1600, seed=10 * w + k)
    write_wav(root / "_background_noise_" / "noise.wav", 16000, seed=99)
    os.symlink(REPO / "examples", tmp_path / "examples")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    outs = []
    for command in cmds:
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        outs.append(proc.stderr)
    classes = (tmp_path / "manifests" / "classes.txt").read_text().split()
    assert sorted(classes) == sorted(words)
    valid = (tmp_path / "manifests" / "valid.tsv").read_text().splitlines()[1:]
    labels = (tmp_path / "manifests" / "valid.lbl").read_text().splitlines()
    assert len(valid) == len(labels) > 0
    for line, label in zip(valid, labels):
        assert classes[int(label)] == line.split("/")[0]
    missing = [w for w in words if not any(line.startswith(w + "/") for line in valid)]
    for word in missing:
        assert "warning" in outs[2] and word in outs[2]
