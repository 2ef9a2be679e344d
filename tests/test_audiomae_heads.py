"""A converted fine-tuned AudioMAE file keeps its head: evaluate.py and predict.py score with it.

examples/finetuning/evaluate.py and examples/predict.py score audio with the converted file
directly, given a class list of the head's size. Random weights in AudioMAE's fine-tuned key
layout (narrow: 64 wide, 2 blocks, all 513 positions; the writers of tests/audiomae.py) are
converted with the real CLI; the scores must equal a direct computation from the checkpoint's
tensors (its reference forward pass -> mean of the patch tokens -> fc_norm -> head -> sigmoid,
averaged over the clip's 1024-frame windows) within 1e-5.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from mam_clap_plugin import load_encoder_with_stats
from mam_clap_plugin.checkpoint import CheckpointError, save_encoder
from mam_clap_plugin.data.audio import NORM_STATS, load_audio, normalize_fbank, wav_to_fbank
from mam_clap_plugin.data.manifest import write_class_list, write_labels, write_manifest
from mam_clap_plugin.inference import load_classifier, score_waveforms
from mam_clap_plugin.metrics import classification_metrics

from . import readme
from .audiomae import audiomae_encoder, finetuned, reference_forward, released
from .conftest import REPO, load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_CLASSES = 5
NAMES = ["speech", "music", "dog", "rain", "siren"]
TARGET_LENGTH = 1024  # the converted file's grid (513 positions)
#: clip lengths in seconds: one window, and two windows (the second zero-padded)
SECONDS = (0.7, 11.0, 1.3)


def convert(src, out) -> int:
    return load_script("examples/convert/audiomae_to_mam_clap.py").main([str(src), str(out), "--num-heads", "4"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The AudioMAE-layout files, their conversions, generated clips and a data dir."""
    root = tmp_path_factory.mktemp("heads")
    enc = audiomae_encoder(64, 2, seed=11)
    ft = finetuned(enc, classes=NUM_CLASSES, seed=12)
    ft["head.bias"] = 0.5 * torch.randn(NUM_CLASSES, generator=torch.Generator().manual_seed(13))
    torch.save(released(ft), root / "finetuned.pth")
    torch.save(released(enc), root / "pretrained.pth")
    assert convert(root / "finetuned.pth", root / "ft.safetensors") == 0
    assert convert(root / "pretrained.pth", root / "pre.safetensors") == 0
    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir()
    names, lengths = [], []
    for i, seconds in enumerate(SECONDS):
        n = int(seconds * 16000)
        t = np.arange(n) / 16000
        x = 0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t) + 0.05 * rng.standard_normal(n)
        sf.write(audio / f"clip{i}.wav", x.astype(np.float32), 16000)
        names.append(f"clip{i}.wav")
        lengths.append(n)
    data = root / "data"
    data.mkdir()
    write_manifest(str(data / "eval.tsv"), str(audio), names, lengths)
    write_labels(str(data / "eval.lbl"), [[0, 2], [1], [3, 4]])
    write_class_list(str(data / "classes.txt"), NAMES)
    write_class_list(str(root / "short.txt"), NAMES[:4])
    return {"root": root, "ft": ft, "export": str(root / "ft.safetensors"), "pre": str(root / "pre.safetensors"),
            "wavs": [str(audio / n) for n in names], "data": str(data), "classes": str(data / "classes.txt")}


def expected_scores(ft, wav_path):
    """(K,) sigmoid scores from the checkpoint's tensors, averaged over 1024-frame windows."""
    wav = load_audio(wav_path)
    frames = 1 + (wav.shape[0] - 400) // 160
    count = -(-frames // TARGET_LENGTH)
    fbank = normalize_fbank(wav_to_fbank(wav, count * TARGET_LENGTH), *NORM_STATS["audioset"])
    x = fbank.reshape(count, TARGET_LENGTH, -1).unsqueeze(1)
    with torch.no_grad():
        _, tokens = reference_forward(ft, x, 4)  # fine-tuned: no norm.*, the last block's tokens
        pooled = F.layer_norm(tokens[:, 1:].mean(dim=1), (64,), ft["fc_norm.weight"], ft["fc_norm.bias"], eps=1e-6)
        logits = F.linear(pooled, ft["head.weight"], ft["head.bias"])
    return torch.sigmoid(logits).mean(dim=0).numpy()


@pytest.fixture(scope="module")
def expected(files):
    return np.stack([expected_scores(files["ft"], w) for w in files["wavs"]])


def test_load_classifier_scores_match_direct_computation(files, expected):
    clf = load_classifier(files["export"], files["classes"])
    assert clf.class_names == NAMES and clf.loss == "bce" and clf.target_length == TARGET_LENGTH
    assert (clf.task.norm_mean, clf.task.norm_std) == NORM_STATS["audioset"]
    got = score_waveforms(clf, [load_audio(w) for w in files["wavs"]])
    assert got.shape == (len(SECONDS), NUM_CLASSES)
    assert np.abs(got - expected).max() <= 1e-5
    assert expected.std() > 0.01  # the scores differ between clips and classes: the check means something


def test_predict_cli(files, expected, capsys):
    predict = load_script("examples/predict.py")
    capsys.readouterr()
    assert predict.main([*files["wavs"], "--checkpoint", files["export"], "--class-list-file", files["classes"],
                         "--top-k", str(NUM_CLASSES), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == files["wavs"]
    for r, want in zip(results, expected):
        scores = [t["score"] for t in r["top"]]
        assert scores == sorted(scores, reverse=True)
        got = np.array([next(t["score"] for t in r["top"] if t["class"] == name) for name in NAMES])
        assert np.abs(got - want).max() <= 1e-5


def test_evaluate_cli(files, expected, capsys, tmp_path):
    evaluate = load_script("examples/finetuning/evaluate.py")
    report_path = tmp_path / "eval.json"
    assert evaluate.main([files["export"], files["data"], "eval", "--json", str(report_path), "--no-progress"]) == 0
    report = json.loads(report_path.read_text())
    target = np.zeros((len(SECONDS), NUM_CLASSES), dtype=np.float32)
    for i, ids in enumerate([[0, 2], [1], [3, 4]]):
        target[i, ids] = 1.0
    want = classification_metrics(expected, target)
    assert report["num_clips"] == len(SECONDS) and report["classes_left_out"] == 0
    assert report["mAP"] == pytest.approx(want.mAP, abs=1e-5)
    assert report["accuracy"] == pytest.approx(want.accuracy, abs=1e-5)
    assert sorted(report["per_class_ap"]) == sorted(NAMES)


def test_wrong_class_lists_and_headless_exports_are_refused(files, capsys, tmp_path):
    predict = load_script("examples/predict.py")
    evaluate = load_script("examples/finetuning/evaluate.py")
    wav = files["wavs"][0]
    capsys.readouterr()
    short = str(files["root"] / "short.txt")
    assert predict.main([wav, "--checkpoint", files["export"], "--class-list-file", short]) == 1
    err = capsys.readouterr().err
    assert "short.txt: 4 classes" in err and f"{NUM_CLASSES} outputs" in err
    assert predict.main([wav, "--checkpoint", files["export"]]) == 1
    assert "keeps no class names" in capsys.readouterr().err
    assert predict.main([wav, "--checkpoint", files["pre"], "--class-list-file", files["classes"]]) == 1
    err = capsys.readouterr().err
    assert "without a classifier head" in err and "model.model_path=" in err and "fairseq-hydra-train" in err
    # evaluate.py reads DATA_DIR's class list: six names for a five-class head
    write_class_list(str(tmp_path / "six.txt"), NAMES + ["wind"])
    assert evaluate.main([files["export"], files["data"], "eval", "--class-list", str(tmp_path / "six.txt"),
                          "--json", str(tmp_path / "r.json"), "--no-progress"]) == 1
    assert "six.txt: 6 classes" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_commands_run_verbatim(files, tmp_path):
    """The README's commands for a converted head, run as shown in a scratch dir holding
    ``finetuned_as2m.pth``, ``clip.wav`` and ``audioset/`` (eval split and classes.txt), with
    ``examples/`` linked in as in a checkout."""
    section = readme.section("## Start from AudioMAE's weights")
    section = section.split("**Score audio with a fine-tuned AudioMAE head.**")[1]
    cmds = readme.commands(section.split("\n\n**")[0], "python")
    assert [c.split()[1] for c in cmds] == ["examples/convert/audiomae_to_mam_clap.py", "examples/predict.py",
                                            "examples/finetuning/evaluate.py"]
    shutil.copy(files["root"] / "finetuned.pth", tmp_path / "finetuned_as2m.pth")
    shutil.copy(files["wavs"][1], tmp_path / "clip.wav")
    shutil.copytree(files["data"], tmp_path / "audioset")
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    outs = []
    for command in cmds:
        argv = readme.words(command, {"PATH": os.environ["PATH"]})
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        outs.append(proc.stdout + proc.stderr)
    assert f"head {NUM_CLASSES} classes kept" in outs[0] and (tmp_path / "audiomae_as2m.safetensors").is_file()
    assert sum(name in outs[1] for name in NAMES) == NUM_CLASSES  # --top-k 5: every class, by name
    report = json.loads((tmp_path / "audiomae_as2m_eval.json").read_text())
    assert report["num_clips"] == len(SECONDS) and sorted(report["per_class_ap"]) == sorted(NAMES)


def test_head_on_an_encoder_with_a_final_norm_is_refused(files, tmp_path):
    """Mean pooling replaces the encoder's final LayerNorm by fc_norm: an export that keeps
    both does not load strictly, and the error lists the keys."""
    bundle = load_encoder_with_stats(files["pre"])
    head = {"config": {"num_classes": NUM_CLASSES, "pooling": "mean"},
            "weights": {k: files["ft"][k] for k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")}}
    out = str(tmp_path / "both.safetensors")
    save_encoder(out, bundle.encoder, bundle.encoder.config, bundle.norm_mean, bundle.norm_std, "audioset",
                 TARGET_LENGTH, "pre.safetensors", head=head)
    unexpected = r"missing \[\], unexpected \['encoder.norm.weight', 'encoder.norm.bias'\]"
    with pytest.raises(CheckpointError, match=unexpected):
        load_classifier(out, files["classes"])
