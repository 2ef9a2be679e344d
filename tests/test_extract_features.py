"""Feature extraction with a trained encoder (examples/extract_features.py) on generated audio.

Levels, layers, both output formats, clips longer than one 10.24 s window, resuming after an
interruption, bad files."""
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mam_clap_plugin.checkpoint import save_encoder
from mam_clap_plugin.data.manifest import write_manifest
from mam_clap_plugin.features import num_steps
from mam_clap_plugin.modules.encoder import AudioEncoder
from upstream.expert import UpstreamExpert

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "extract_features.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
DIM, DEPTH = 32, 2
#: name -> (seconds, sample rate, channels); 12.5 s spans two 10.24 s windows.
CLIPS = {"a/short.wav": (0.3, 16000, 1), "a/one.wav": (1.0, 16000, 1), "b/long.flac": (12.5, 16000, 1),
         "b/stereo44k.wav": (2.0, 44100, 2)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    audio = root / "audio"
    rng = np.random.default_rng(0)
    for name, (seconds, rate, channels) in CLIPS.items():
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        n = int(seconds * rate)
        t = np.arange(n) / rate
        x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)
        sf.write(str(audio / name), np.stack([x] * channels, axis=1) if channels > 1 else x, rate)
    torch.manual_seed(0)
    encoder = AudioEncoder(embed_dim=DIM, depth=DEPTH, num_heads=4, max_frames=1024).eval()
    config = {"embed_dim": DIM, "depth": DEPTH, "num_heads": 4, "mlp_ratio": 4.0, "max_frames": 1024}
    ckpt = root / "encoder.safetensors"
    save_encoder(str(ckpt), encoder, config, -4.27, 4.57, "-4.27,4.57", 1024, "random")
    return {"root": root, "audio": audio, "ckpt": str(ckpt)}


def run(setup, out, *extra, source=None):
    main = runpy.run_path(str(SCRIPT))["main"]
    return main([str(source or setup["audio"]), "--checkpoint", setup["ckpt"], "--out", str(out), "--device", "cpu",
                 "--batch-size", "3", *extra])


def expert_outputs(setup, name):
    """The s3prl upstream's features of one clip: depth + 1 hidden states and the final output."""
    from mam_clap_plugin.data.audio import load_audio

    expert = setup.setdefault("expert", UpstreamExpert(setup["ckpt"]).eval())
    with torch.no_grad():
        out = expert([load_audio(str(setup["audio"] / name))])
    return [h[0] for h in out["hidden_states"]] + [out["last_hidden_state"][0]]


def test_levels_and_layers_match_the_upstream(setup, tmp_path, capsys):
    assert run(setup, tmp_path / "frame", "--level", "frame", "--layer", "all") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["done"] == 4
    assert run(setup, tmp_path / "patch", "--level", "patch") == 0
    assert run(setup, tmp_path / "clip", "--level", "clip", "--layer", "1") == 0
    for name, (seconds, rate, _) in CLIPS.items():
        ref = expert_outputs(setup, name)
        steps = num_steps(-(-int(seconds * rate) * 16000 // rate))
        frame = np.load(tmp_path / "frame" / f"{name}.npy")
        assert frame.shape == (DEPTH + 1, steps, DIM) and frame.dtype == np.float32
        for layer in range(DEPTH + 1):
            np.testing.assert_allclose(frame[layer], ref[layer].numpy(), atol=1e-5)
        patch = np.load(tmp_path / "patch" / f"{name}.npy")
        assert patch.shape == (steps, 8, DIM)
        np.testing.assert_allclose(patch.mean(axis=1), ref[-1].numpy(), atol=1e-5)
        clip = np.load(tmp_path / "clip" / f"{name}.npy")
        assert clip.shape == (DIM,)
        np.testing.assert_allclose(clip, ref[1].numpy().mean(axis=0), atol=1e-5)
    assert num_steps(200000) == 79  # two windows: 64 + 15 steps
    settings = json.loads((tmp_path / "clip" / "features.json").read_text())
    assert settings["layer"] == 1 and settings["level"] == "clip" and settings["window_frames"] == 1024
    assert settings["bad"] == 0 and len(settings["checkpoint_sha256"]) == 64


def test_memmap_equals_per_file_arrays(setup, tmp_path):
    manifest = tmp_path / "set.tsv"
    names = sorted(CLIPS)
    write_manifest(str(manifest), str(setup["audio"]), names, [int(CLIPS[n][0] * CLIPS[n][1]) for n in names])
    assert run(setup, tmp_path / "npy", "--level", "frame", source=manifest) == 0
    assert run(setup, tmp_path / "mm", "--level", "frame", "--format", "memmap", source=manifest) == 0
    feats = np.load(tmp_path / "mm" / "features.npy", mmap_mode="r")
    lines = (tmp_path / "mm" / "index.tsv").read_text().splitlines()
    assert lines[0] == "path\toffset\trows" and len(lines) == 1 + len(names)
    for line in lines[1:]:
        rel, offset, rows = line.split("\t")
        start, stop = int(offset), int(offset) + int(rows)
        np.testing.assert_array_equal(feats[start:stop], np.load(tmp_path / "npy" / f"{rel}.npy"))
    assert feats.shape[0] == sum(int(line.split("\t")[2]) for line in lines[1:])
    assert np.load(tmp_path / "mm" / "status.npy").tolist() == [1] * len(names)
    # clip level with all layers: (L, files, D)
    assert run(setup, tmp_path / "mmclip", "--level", "clip", "--layer", "all", "--format", "memmap") == 0
    assert np.load(tmp_path / "mmclip" / "features.npy").shape == (DEPTH + 1, len(names), DIM)


@pytest.mark.parametrize("fmt", ["npy", "memmap"])
def test_resumes_after_an_interruption(setup, tmp_path, fmt, capsys):
    """A run killed after two files keeps them; the next run does the rest, and the result
    equals an uninterrupted run's."""
    mod = runpy.run_path(str(SCRIPT))
    writer = mod["NpyWriter" if fmt == "npy" else "MemmapWriter"]
    original, calls = writer.write, []

    def write_then_die(self, i, array):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(i)
        original(self, i, array)

    writer.write = write_then_die
    args = [str(setup["audio"]), "--checkpoint", setup["ckpt"], "--out", str(tmp_path / "out"), "--device", "cpu",
            "--batch-size", "1", "--level", "frame", "--format", fmt]
    with pytest.raises(KeyboardInterrupt):
        mod["main"](args)
    writer.write = original
    capsys.readouterr()
    assert mod["main"](args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["kept_from_earlier_runs"] == 2 and summary["written_this_run"] == 2 and summary["done"] == 4
    assert run(setup, tmp_path / "fresh", "--level", "frame", "--format", fmt) == 0
    if fmt == "npy":
        for name in CLIPS:
            np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{name}.npy"),
                                          np.load(tmp_path / "fresh" / f"{name}.npy"))
    else:
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "features.npy"),
                                      np.load(tmp_path / "fresh" / "features.npy"))
    # other settings into the same OUT are refused
    assert mod["main"](args[:-4] + ["--level", "clip", "--format", fmt]) == 2
    assert "other settings (level: 'frame' -> 'clip')" in capsys.readouterr().err


def test_bad_files_fail_or_are_skipped(setup, tmp_path, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(str(audio / "good.wav"), 0.1 * np.ones(8000), 16000)
    (audio / "broken.wav").write_bytes(b"RIFF not really audio")
    sf.write(str(audio / "empty.wav"), np.zeros(0), 16000)
    sf.write(str(audio / "nan.wav"), np.full(4000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    main = runpy.run_path(str(SCRIPT))["main"]
    args = [str(audio), "--checkpoint", setup["ckpt"], "--device", "cpu", "--level", "frame"]
    assert main(args + ["--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"error: bad file: {audio / 'broken.wav'}: cannot read audio" in err and "--skip-bad-files" in err
    for fmt in ("npy", "memmap"):
        out = tmp_path / f"skip_{fmt}"
        assert main(args + ["--out", str(out), "--skip-bad-files", "--format", fmt]) == 0
        captured = capsys.readouterr()
        for name, problem in (("broken.wav", "cannot read audio"), ("empty.wav", "empty"), ("nan.wav", "NaN")):
            assert f"skipping bad file: {audio / name}: " in captured.err and problem in captured.err
        summary = json.loads(captured.out.splitlines()[-1])
        assert summary["done"] == 1 and summary["bad_files"] == ["broken.wav", "empty.wav", "nan.wav"]
        bad = (out / "bad_files.tsv").read_text().splitlines()
        assert [line.split("\t")[0] for line in bad] == ["broken.wav", "empty.wav", "nan.wav"]
        assert "features: 100%" in captured.err  # tqdm's bar
    assert (tmp_path / "skip_npy" / "good.wav.npy").is_file() and not (tmp_path / "skip_npy" / "nan.wav.npy").exists()
    assert np.load(tmp_path / "skip_memmap" / "status.npy").tolist() == [2, 2, 1, 2]


def test_usage_errors(setup, tmp_path, capsys):
    assert run(setup, tmp_path / "o", "--layer", "7") == 2
    assert "--layer 7: the encoder has hidden states 0..2" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run(setup, tmp_path / "o", source=tmp_path / "empty") == 2
    assert "no audio files" in capsys.readouterr().err
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main([str(setup["audio"]), "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "none.pt: checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_export_and_extract_commands_run_verbatim(setup, pretraining_checkpoint, tmp_path):
    """The README's export command and its two extraction commands, run as shown in a scratch dir
    holding the demo's checkpoint path (a real fairseq-hydra-train checkpoint), ``clips/``,
    ``train.tsv`` over those clips (plus one missing file) and ``audiomae.safetensors`` (an encoder
    export; any file load_encoder reads), with ``examples/`` linked in as in a checkout."""
    import os
    import shutil
    import subprocess
    import sys

    from . import readme

    cmds = readme.commands(readme.section("## Use the encoder without fairseq"), "python")
    cmds += readme.commands(readme.section("## Extract features"), "python")
    assert [c.split()[1] for c in cmds] == ["examples/export_encoder.py"] + ["examples/extract_features.py"] * 2
    demo = tmp_path / "outputs" / "demo" / "supmam" / "checkpoints"
    demo.mkdir(parents=True)
    shutil.copy(pretraining_checkpoint, demo / "checkpoint_last.pt")
    shutil.copytree(setup["audio"], tmp_path / "clips")
    names = sorted(str(p.relative_to(setup["audio"])) for p in setup["audio"].rglob("*.*"))
    write_manifest(str(tmp_path / "train.tsv"), str(tmp_path / "clips"), names + ["missing.wav"],
                   [1] * (len(names) + 1))
    shutil.copy(setup["ckpt"], tmp_path / "audiomae.safetensors")
    os.symlink(REPO / "examples", tmp_path / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in cmds:
        argv = readme.words(command, {"PATH": os.environ["PATH"]})
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    config = json.loads((tmp_path / "encoder.json").read_text())
    assert config["format"] == "mam_clap_encoder" and config["source"]["file"] == "checkpoint_last.pt"
    assert (tmp_path / "encoder.safetensors").is_file()
    # the folder run: one (T, D) array per clip; the manifest run: every layer, one row per clip,
    # the missing file skipped
    for name in names:
        frames = np.load(tmp_path / "feats" / f"{name}.npy")
        assert frames.ndim == 2 and frames.shape[1] == config["encoder"]["embed_dim"], name
    index = (tmp_path / "feats_mm" / "index.tsv").read_text()
    status = np.load(tmp_path / "feats_mm" / "status.npy")
    assert sorted(status.tolist()) == [1] * len(names) + [2]
    assert "missing.wav" in (tmp_path / "feats_mm" / "bad_files.tsv").read_text()
    features = np.load(tmp_path / "feats_mm" / "features.npy", mmap_mode="r")
    assert features.shape == (DEPTH + 1, len(names) + 1, DIM)  # the missing file keeps its row, marked bad
    assert all(name in index for name in names) and np.isfinite(features[:, : len(names)]).all()
