"""SUPERB keyword spotting through s3prl: the launcher, its config, the data layout and the comparison.

The launcher is upstream/run_downstream.py. Its argument parser and checks run in this process
(s3prl imported once, with the compat shims); real s3prl training and evaluation run as
subprocesses (marked slow) through examples/superb/compare_upstreams.py, on a tiny generated
keyword set, for ``fbank`` and for ``supmam_clap_local`` with a tiny random encoder.
"""
import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from .conftest import load_script

REPO = Path(__file__).resolve().parents[1]
mdk = load_script("examples/prepare/make_demo_keywords.py")
scp = load_script("examples/prepare/speech_commands_s3prl.py")

CONFIG = REPO / "upstream" / "config" / "speech_commands.yaml"
LAUNCHER = REPO / "upstream" / "run_downstream.py"
COMPARE = REPO / "examples" / "superb" / "compare_upstreams.py"
SC_CLASSES = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_unknown_", "_silence_"]


@pytest.fixture(scope="module")
def launcher():
    """The launcher module with s3prl imported (shims installed, entry registered).

    install_shims() adds argparse.Namespace to torch's weights-only allow-list; that is
    undone after this module."""
    safe = list(torch.serialization.get_safe_globals())
    import upstream.run_downstream as launcher

    launcher.prepare()
    yield launcher
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(safe)


@pytest.fixture(scope="module")
def tiny_encoder(pretraining_checkpoint, tmp_path_factory):  # trains: the tests using it are slow (conftest)
    """The encoder export of a tiny SupMAM checkpoint written by fairseq-hydra-train (32 dims, 2 layers)."""
    from mam_clap_plugin.checkpoint import export_encoder

    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    export_encoder(pretraining_checkpoint, str(path))
    return str(path)


# ---------------------------------------------------------------------------- config


def test_config_has_superb_values():
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["optimizer"] == {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-4}
    assert cfg["runner"]["total_steps"] == 200000 and cfg["runner"]["eval_step"] == 4000
    assert cfg["runner"]["eval_dataloaders"] == ["dev", "test"]
    assert "scheduler" not in cfg
    datarc = cfg["downstream_expert"]["datarc"]
    assert datarc["batch_size"] == 32 and set(datarc) == {
        "speech_commands_root", "speech_commands_test_root", "num_workers", "batch_size"}
    assert cfg["downstream_expert"]["modelrc"] == {
        "projector_dim": 256, "select": "UtteranceLevel", "UtteranceLevel": {"pooling": "MeanPooling"}}


# ---------------------------------------------------------------------------- launcher


def test_launcher_takes_exactly_s3prls_arguments(launcher, monkeypatch):
    import s3prl.run_downstream as rd

    parser = launcher.s3prl_argument_parser()
    # the parser is built by s3prl's own get_downstream_args (not a copy)
    assert parser.parse_args.__func__ is argparse.ArgumentParser.parse_args
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"-m", "-t", "-o", "-e", "-i", "-c", "-d", "-u", "-k", "-g", "-p", "-n", "-a", "--device",
            "--seed", "--upstream_feature_selection"} <= options
    # the launcher's command line is that parser: its --help is the parser's help
    monkeypatch.setattr(sys, "argv", ["run_downstream.py", "--help"])
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        launcher.main()
    assert exc.value.code == 0
    parser.prog = "run_downstream.py"
    assert buf.getvalue() == parser.format_help()
    assert rd.get_downstream_args.__module__ == "s3prl.run_downstream"  # restored after main


def test_entry_is_registered_in_s3prl_hub(launcher, tiny_encoder):
    from s3prl import hub

    from upstream.hubconf import supmam_clap_local

    assert hub.supmam_clap_local is supmam_clap_local
    # what s3prl's Runner does with it
    model = hub.supmam_clap_local(ckpt=tiny_encoder, model_config=None, refresh=False)
    assert model.get_downsample_rates("hidden_states") == 2560
    with torch.no_grad():
        out = model([torch.zeros(16000), 0.1 * torch.randn(8000)])
    assert out["hidden_states"][0].shape[:2] == (2, 7)


def _run_launcher_until_runner(launcher, monkeypatch, argv):
    """launcher.main() with s3prl's main() cut down to argument parsing (no Runner)."""
    import s3prl.run_downstream as rd

    monkeypatch.setattr(rd, "main", lambda: rd.get_downstream_args())
    monkeypatch.setattr(sys, "argv", ["run_downstream.py", *map(str, argv)])
    launcher.main()


def _train_argv(tmp_path, root, test_root, batch_size):
    return ["-m", "train", "-d", "speech_commands", "-u", "fbank", "-c", CONFIG, "-p", tmp_path / "exp",
            "--device", "cpu", "-o",
            f"config.downstream_expert.datarc.speech_commands_root={root},,"
            f"config.downstream_expert.datarc.speech_commands_test_root={test_root},,"
            f"config.downstream_expert.datarc.batch_size={batch_size}"]


def test_refuses_train_set_smaller_than_batch(launcher, keywords, monkeypatch, tmp_path, capsys):
    out, summary = keywords
    n_train = summary["s3prl_sizes"]["train"]
    with pytest.raises(SystemExit) as exc:
        _run_launcher_until_runner(launcher, monkeypatch, _train_argv(tmp_path, out / "train", out / "test",
                                                                      n_train + 1))
    msg = str(exc.value.code)
    assert f"has {n_train} items" in msg and f"batch_size={n_train + 1}" in msg and "loop forever" in msg
    # exactly one batch is accepted
    _run_launcher_until_runner(launcher, monkeypatch, _train_argv(tmp_path, out / "train", out / "test", n_train))
    assert f"'train': {n_train}" in capsys.readouterr().err


def test_refuses_bad_speech_commands_roots(launcher, keywords, monkeypatch, tmp_path):
    out, _ = keywords
    with pytest.raises(SystemExit, match="speech_commands_root .* is not a directory"):
        _run_launcher_until_runner(launcher, monkeypatch, _train_argv(tmp_path, tmp_path / "nope", out / "test", 4))
    # a test root with a folder that is not one of s3prl's 12 classes
    with pytest.raises(SystemExit, match="not s3prl speech_commands classes"):
        _run_launcher_until_runner(launcher, monkeypatch, _train_argv(tmp_path, out / "train", out / "train", 4))


def _train_speaker_root(root: Path, noise_seconds=None) -> Path:
    """A train root whose clips all belong to s3prl's train speakers (the dev split holds only
    the ``_background_noise_`` files, if any): 24 clips of ``yes``."""
    from s3prl.downstream.speech_commands.expert import split_dataset

    rng = np.random.default_rng(0)
    (root / "yes").mkdir(parents=True)
    for i in range(48):
        sf.write(str(root / "yes" / f"{i:08x}_nohash_0.wav"), 0.1 * rng.standard_normal(1600), 16000)
    _, valid = split_dataset(str(root))
    for _, path in valid:
        os.remove(path)
    if noise_seconds is not None:
        (root / "_background_noise_").mkdir()
        sf.write(str(root / "_background_noise_" / "hum.wav"),
                 0.1 * rng.standard_normal(int(noise_seconds * 16000)), 16000)
    train, valid = split_dataset(str(root))
    assert len(train) >= 24 and not valid
    return root


def test_refuses_noise_shorter_than_one_second(launcher, keywords, monkeypatch, tmp_path):
    out, _ = keywords
    root = _train_speaker_root(tmp_path / "short", noise_seconds=0.5)
    with pytest.raises(SystemExit, match=r"_background_noise_/hum\.wav is shorter than 1 s: s3prl crops 1 s"):
        _run_launcher_until_runner(launcher, monkeypatch, _train_argv(tmp_path, root, out / "test", 4))
    # exactly 1 s is enough (and its file is the dev split's one item)
    root = _train_speaker_root(tmp_path / "ok", noise_seconds=1.0)
    _run_launcher_until_runner(launcher, monkeypatch, _train_argv(tmp_path, root, out / "test", 4))


def test_refuses_an_empty_dev_split(launcher, keywords, monkeypatch, tmp_path):
    out, _ = keywords
    root = _train_speaker_root(tmp_path / "nodev")
    with pytest.raises(SystemExit, match=r"the dev split of .*nodev is empty .*divide by zero"):
        _run_launcher_until_runner(launcher, monkeypatch, _train_argv(tmp_path, root, out / "test", 4))


def test_device_defaults_to_what_exists(launcher, keywords, monkeypatch, tmp_path, capsys):
    """No --device: s3prl's cuda with CUDA, else cpu; a given --device is left alone."""
    argv = ["-m", "evaluate", "-e", "x/dev-best.ckpt"]
    assert launcher.with_device(argv, cuda_available=False) == [*argv, "--device", "cpu"]
    assert launcher.with_device(argv, cuda_available=True) == argv
    for given in (["--device", "cuda:1"], ["--device=cuda:1"], ["--dev", "cuda:1"], ["--device"]):
        assert launcher.with_device([*argv, *given], cuda_available=False) == [*argv, *given]
    # through the launcher on this machine: s3prl's parsed args carry the device that exists
    import s3prl.run_downstream as rd

    out, _ = keywords
    seen = {}
    monkeypatch.setattr(rd, "main", lambda: seen.setdefault("args", rd.get_downstream_args()[0]))
    train = [a for a in _train_argv(tmp_path, out / "train", out / "test", 4) if a not in ("--device", "cpu")]
    monkeypatch.setattr(sys, "argv", ["run_downstream.py", *map(str, train)])
    launcher.main()
    assert seen["args"].device == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert "no CUDA device: running on the CPU" in capsys.readouterr().err


def test_sizes_match_s3prl_split(launcher, keywords):
    from s3prl.downstream.speech_commands.dataset import SpeechCommandsDataset, SpeechCommandsTestingDataset
    from s3prl.downstream.speech_commands.expert import split_dataset

    out, summary = keywords
    datarc = {"speech_commands_root": str(out / "train"), "speech_commands_test_root": str(out / "test")}
    train_list, valid_list = split_dataset(datarc["speech_commands_root"])
    sizes = {"train": len(SpeechCommandsDataset(train_list, **datarc)),
             "dev": len(SpeechCommandsDataset(valid_list, **datarc)),
             "test": len(SpeechCommandsTestingDataset(**datarc))}
    assert launcher.speech_commands_sizes(datarc) == sizes == summary["s3prl_sizes"]
    # make_demo_keywords' bucket function is s3prl's split
    dev_names = {Path(p).name for _, p in valid_list}
    assert dev_names and all(mdk.s3prl_bucket(n) == "dev" for n in dev_names)
    assert all(mdk.s3prl_bucket(Path(p).name) == "train" for _, p in train_list)


# ---------------------------------------------------------------------------- data


def test_demo_keywords_layout_and_determinism(keywords, tmp_path):
    out, summary = keywords
    test_dirs = sorted(p.name for p in (out / "test").iterdir())
    assert test_dirs == sorted(SC_CLASSES)
    train_dirs = {p.name for p in (out / "train").iterdir()}
    assert train_dirs == set(mdk.WORDS) | {"_background_noise_"}
    for noise in (out / "train" / "_background_noise_").glob("*.wav"):
        assert sf.info(str(noise)).duration >= 1.0
    for wav in (out / "test" / "_silence_").glob("*.wav"):
        info = sf.info(str(wav))
        assert info.samplerate == 16000 and info.frames == 16000
    sizes = summary["s3prl_sizes"]
    assert sizes["train"] > 32 and sizes["dev"] > 6 and sizes["test"] == 12
    assert all(n.endswith(".wav") and "_nohash_" in n for n in os.listdir(out / "train" / "yes"))
    # same seed, same bytes; another seed, other audio
    again = mdk.make_demo_keywords(tmp_path / "a", seed=3, voices=6, noise_seconds=2.0, progress=False)
    other = mdk.make_demo_keywords(tmp_path / "b", seed=4, voices=6, noise_seconds=2.0, progress=False)
    rel = "train/yes/" + sorted(os.listdir(out / "train" / "yes"))[0]

    def digest(root):
        return hashlib.sha1((Path(root) / rel).read_bytes()).hexdigest()

    assert digest(out) == digest(again["out_dir"]) != digest(other["out_dir"])
    assert again["folders"] == summary["folders"]


def _fake_corpus(root: Path, v2=False):
    """A tiny fake v0.01 corpus: the train archive (words, noise, lists) and the test archive."""
    rng = np.random.default_rng(0)
    train, test = root / "speech_commands_v0.01", root / "speech_commands_test_set_v0.01"
    words = mdk.KEYWORDS + ("bed", "marvin") + (("learn",) if v2 else ())
    for w in words:
        (train / w).mkdir(parents=True)
        for spk in ("0a7c2a8d", "1b4c9b89", "c1d39ce8", "ffd2ba2f"):
            sf.write(str(train / w / f"{spk}_nohash_0.wav"), 0.1 * rng.standard_normal(16000), 16000)
    (train / "_background_noise_").mkdir()
    sf.write(str(train / "_background_noise_" / "white_noise.wav"), 0.1 * rng.standard_normal(32000), 16000)
    (train / "validation_list.txt").write_text("yes/0a7c2a8d_nohash_0.wav\n")
    (train / "testing_list.txt").write_text("yes/1b4c9b89_nohash_0.wav\n")
    for c in SC_CLASSES:
        (test / c).mkdir(parents=True)
        sf.write(str(test / c / "0a0a0a0a_nohash_0.wav"), 0.1 * rng.standard_normal(16000), 16000)
    return train, test


def test_compare_evaluates_dev_best_else_the_newest_states(tmp_path):
    compare = load_script("examples/superb/compare_upstreams.py")
    assert compare.eval_checkpoint(str(tmp_path)) is None
    for step in (4, 10, 8):
        (tmp_path / f"states-{step}.ckpt").write_bytes(b"")
    assert compare.eval_checkpoint(str(tmp_path)) == str(tmp_path / "states-10.ckpt")  # by step, not by name
    (tmp_path / "dev-best.ckpt").write_bytes(b"")
    assert compare.eval_checkpoint(str(tmp_path)) == str(tmp_path / "dev-best.ckpt")


def test_speech_commands_layout_symlink_copy_and_archive(tmp_path):
    train, test = _fake_corpus(tmp_path)
    s = scp.prepare(str(train), str(test), str(tmp_path / "out"))
    out = tmp_path / "out"
    assert (out / "train" / "yes").is_symlink() and not (out / "train" / "validation_list.txt").exists()
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(SC_CLASSES)
    assert s["train"]["words"]["marvin"] == 4 and s["test"]["_silence_"] == 1
    n_words = 12 * 4
    assert s["train"]["s3prl_train"] + s["train"]["s3prl_dev"] + s["train"]["dropped_by_s3prl"] == n_words + 2
    assert s["override"].startswith(f"config.downstream_expert.datarc.speech_commands_root={out / 'train'},,")
    with pytest.raises(scp.LayoutError, match="exists; pass --force"):
        scp.prepare(str(train), str(test), str(out))
    s = scp.prepare(str(train), str(test), str(out), mode="copy", force=True)
    assert not (out / "train" / "yes").is_symlink() and (out / "train" / "yes" / "0a7c2a8d_nohash_0.wav").is_file()
    assert train.exists() and (train / "yes" / "0a7c2a8d_nohash_0.wav").exists()  # --force left the source alone
    # the official archives themselves (one top-level folder each)
    for src in (train, test):
        with tarfile.open(tmp_path / f"{src.name}.tar.gz", "w:gz") as tar:
            tar.add(src, arcname=src.name)
    s = scp.prepare(str(tmp_path / f"{train.name}.tar.gz"), str(tmp_path / f"{test.name}.tar.gz"),
                    str(tmp_path / "ex"))
    assert s["mode"] == "extracted" and (tmp_path / "ex" / "train" / "yes" / "c1d39ce8_nohash_0.wav").is_file()
    assert s["test"]["_unknown_"] == 1


def test_speech_commands_layout_errors(tmp_path, capsys):
    train, test = _fake_corpus(tmp_path / "v2", v2=True)
    with pytest.raises(scp.LayoutError, match="v0.02-only words"):
        scp.prepare(str(train), str(test), str(tmp_path / "o1"))
    assert scp.prepare(str(train), str(test), str(tmp_path / "o1"), any_version=True, force=True)
    train, test = _fake_corpus(tmp_path / "v1")
    with pytest.raises(scp.LayoutError, match="test archive"):  # swapped inputs
        scp.prepare(str(test), str(train), str(tmp_path / "o2"))
    (test / "extra").mkdir()
    assert scp.main(["--train", str(train), "--test", str(test), "--out", str(tmp_path / "o3")]) == 2
    assert "unexpected ['extra']" in capsys.readouterr().err
    (test / "extra").rmdir()
    sf.write(str(train / "_background_noise_" / "short.wav"), np.zeros(8000), 16000)
    with pytest.raises(scp.LayoutError, match="shorter than 1 s"):
        scp.prepare(str(train), str(test), str(tmp_path / "o4"))


# ---------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_compare_upstreams_trains_and_evaluates(keywords, tiny_encoder, tmp_path):
    """Two real s3prl runs (fbank and supmam_clap_local), each train + evaluate through the
    launcher on the CPU: a few steps, dev evaluation, dev-best.ckpt, test accuracy."""
    out, _ = keywords
    cmd = [sys.executable, str(COMPARE), "--data", str(out), "--out-dir", str(tmp_path / "cmp"),
           "--upstream", f"supmam_clap_local:{tiny_encoder}", "--upstream", "fbank",
           "--device", "cpu", "--threads", "1", "--total-steps", "4", "--eval-step", "2",
           "--batch-size", "8", "--num-workers", "0", "--lr", "1e-2", "--seed", "7"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/2] supmam_clap_local: test acc" in proc.stdout and "[2/2] fbank: test acc" in proc.stdout
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(summary["results"]) == ["supmam_clap_local", "fbank"]
    for label, r in summary["results"].items():
        assert "error" not in r, r
        assert 0.0 <= r["test_acc"] <= 100.0
        expdir = Path(r["expdir"])
        assert [h[0] for h in r["dev_history"]] == [2, 4]
        # dev-best.ckpt exists exactly when a dev evaluation beat 0 (s3prl's rule), and is then the
        # one evaluated; otherwise the final states-4.ckpt. Our upstream must reach dev-best.
        improved = any(acc > 0 for _, acc in r["dev_history"])
        assert improved or label != "supmam_clap_local", r["dev_history"]
        assert (expdir / "dev-best.ckpt").is_file() == improved
        assert r["eval_ckpt"] == str(expdir / ("dev-best.ckpt" if improved else "states-4.ckpt"))
        log = (expdir / "log.log").read_text().splitlines()
        tests = [float(line.split(": ")[1]) for line in log if line.startswith("test at step 0: ")]
        assert len(tests) == 1 and round(100 * tests[0], 2) == r["test_acc"]  # s3prl's own record
        assert "--device" in r["train_cmd"] and r["train_cmd"][r["train_cmd"].index("--device") + 1] == "cpu"
        assert r["eval_cmd"][r["eval_cmd"].index("--device") + 1] == "cpu"
        assert (expdir / "test_predict.txt").read_text().count("\n") == 12
    assert summary["results"]["supmam_clap_local"]["ckpt"] == tiny_encoder
    # the README's evaluate line, verbatim (no --device), from another directory, with no CUDA
    r = summary["results"]["supmam_clap_local"]
    (tmp_path / "elsewhere").mkdir()
    proc = subprocess.run([sys.executable, str(LAUNCHER), "-m", "evaluate", "-e", r["eval_ckpt"]],
                          cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no CUDA device: running on the CPU (--device cpu)" in proc.stderr
    accuracy = [float(line.split(": ")[1]) for line in proc.stdout.splitlines() if line.startswith("test acc: ")]
    assert len(accuracy) == 1 and round(100 * accuracy[0], 2) == r["test_acc"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| supmam_clap_local | encoder.pt |" in md and "| fbank | - |" in md
    assert md.count(".ckpt |") == 2
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
