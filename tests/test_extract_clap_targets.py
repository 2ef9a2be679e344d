"""CLAP teacher-target extraction (examples/prepare/extract_clap_targets.py) into target stores.

The store holds the teacher's own maps; extraction resumes, shards, refuses to mix teachers and
names bad audio."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from mam_clap_plugin.data.audio import AudioError, load_teacher_audio
from mam_clap_plugin.data.manifest import read_manifest
from mam_clap_plugin.data.target_store import BAD_AUDIO, WRITTEN, TargetStoreError, open_target_store
from mam_clap_plugin.files import file_sha256
from mam_clap_plugin.teacher import load_clap_teacher

from .conftest import REPO, load_script

SCRIPT = os.path.join(REPO, "examples", "prepare", "extract_clap_targets.py")
extract = load_script("examples/prepare/extract_clap_targets.py")


def run(data, split, ckpt, out, *extra):
    return extract.main([str(data), split, "--checkpoint", ckpt, "--out", str(out), "--num-workers", "0",
                         "--batch-size", "4", *extra])


@pytest.fixture
def data(tone_set, tmp_path):
    """A private copy of the tone set (audio included), manifests pointing at it."""
    copy = shutil.copytree(tone_set, tmp_path / "data", ignore=shutil.ignore_patterns("targets"))
    for split in ("train", "valid"):
        lines = (copy / f"{split}.tsv").read_text().splitlines()
        lines[0] = str(copy / "audio")
        (copy / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return copy


def test_store_holds_the_teachers_maps(data, tmp_path, clap_checkpoint):
    result = run(data, "valid", clap_checkpoint, tmp_path / "out")
    assert result["written"] == 6 and result["bad"] == 0 and result["pending_in_store"] == 0
    store = open_target_store(str(tmp_path / "out" / "valid.tgt"))
    h = store.header
    assert (h.checkpoint_sha256, h.layer, h.projection) == (file_sha256(clap_checkpoint), "final", False)
    assert (h.grid_freq, h.grid_time, h.dim, h.sample_rate, h.seconds, h.num_clips) == (2, 32, 128, 48000, 10.0, 6)
    assert h.extra["checkpoint"] == os.path.basename(clap_checkpoint)
    assert store.check_complete().size == 0
    teacher = load_clap_teacher(clap_checkpoint)
    manifest = read_manifest(str(data / "valid.tsv"))
    wavs = torch.stack([load_teacher_audio(manifest.full_path(i), 48000, 480000) for i in (0, 5)])
    with torch.no_grad():
        maps = teacher(wavs).numpy()
    for row, i in enumerate((0, 5)):  # fp16 storage of the teacher's own (2, 32, C) map
        np.testing.assert_allclose(store[i].astype(np.float32), maps[row], rtol=2e-3, atol=2e-3)


def test_shards_fill_one_store_and_reruns_resume(data, tmp_path, clap_checkpoint):
    out = tmp_path / "out"
    first = run(data, "valid", clap_checkpoint, out, "--num-shards", "2", "--shard-id", "1", "--layer", "stage3")
    assert first["written"] == 3 and first["pending_in_store"] == 3
    states = open_target_store(str(out / "valid.tgt")).states().tolist()
    assert states == [0, 0, 0, WRITTEN, WRITTEN, WRITTEN]
    with pytest.raises(TargetStoreError, match="incomplete, 3 of 6"):
        open_target_store(str(out / "valid.tgt")).check_complete()
    second = run(data, "valid", clap_checkpoint, out, "--num-shards", "2", "--shard-id", "0", "--layer", "stage3")
    assert second["written"] == 3 and second["pending_in_store"] == 0
    again = run(data, "valid", clap_checkpoint, out, "--layer", "stage3")  # nothing left to do
    assert again["written"] == 0 and again["pending_in_store"] == 0
    header = open_target_store(str(out / "valid.tgt")).header
    assert (header.layer, header.grid_freq, header.grid_time, header.dim) == ("stage3", 4, 64, 64)


def test_interrupted_in_a_shard_resumes_redoing_one_batch(data, tmp_path, clap_checkpoint, monkeypatch):
    """Ctrl-C during the third batch of shard 0 (clips 0..5 of 12, batches of 2); the rerun redoes
    only that batch, leaves shard 1 alone, and the store equals an uninterrupted extraction."""
    real_loader = extract.load_teacher
    calls = []

    def counting_loader(*args, **kwargs):
        teacher = real_loader(*args, **kwargs)
        forward = teacher.forward

        def counted(wav):
            calls.append(wav.shape[0])
            if interrupt_at is not None and len(calls) == interrupt_at:
                raise KeyboardInterrupt
            return forward(wav)

        teacher.forward = counted
        return teacher

    monkeypatch.setattr(extract, "load_teacher", counting_loader)
    shard0 = ["--num-shards", "2", "--shard-id", "0", "--batch-size", "2"]
    out = tmp_path / "out"
    interrupt_at = 3
    with pytest.raises(KeyboardInterrupt):
        run(data, "train", clap_checkpoint, out, *shard0)
    states = open_target_store(str(out / "train.tgt")).states().tolist()
    assert states == [WRITTEN] * 4 + [0] * 8  # two batches were written before the interruption
    calls.clear()
    interrupt_at = None
    resumed = run(data, "train", clap_checkpoint, out, *shard0)
    assert calls == [2]  # one batch redone: the interrupted one
    assert resumed["written"] == 2 and resumed["pending_in_store"] == 6
    assert open_target_store(str(out / "train.tgt")).states().tolist() == [WRITTEN] * 6 + [0] * 6
    whole = run(data, "train", clap_checkpoint, tmp_path / "whole", *shard0)
    assert whole["written"] == 6
    a, b = open_target_store(str(out / "train.tgt")), open_target_store(str(tmp_path / "whole" / "train.tgt"))
    for i in range(6):
        np.testing.assert_array_equal(a[i], b[i])


def test_refuses_to_mix_teachers(data, tmp_path, clap_checkpoint):
    out = tmp_path / "out"
    run(data, "valid", clap_checkpoint, out)
    with pytest.raises(TargetStoreError, match=r"valid\.tgt: exists with targets of another teacher.*layer"):
        run(data, "valid", clap_checkpoint, out, "--layer", "stage3")
    with pytest.raises(TargetStoreError, match=r"valid\.tgt: made with another teacher or map.*projection"):
        run(data, "train", clap_checkpoint, out, "--projection")


def test_bad_audio_is_named_or_marked(data, tmp_path, clap_checkpoint):
    manifest = read_manifest(str(data / "valid.tsv"))
    os.remove(manifest.full_path(2))
    with pytest.raises(AudioError, match=r"valid\.tsv:4.*valid_2\.wav: audio file not found.*--skip-bad-files"):
        run(data, "valid", clap_checkpoint, tmp_path / "a")
    result = run(data, "valid", clap_checkpoint, tmp_path / "b", "--skip-bad-files")
    assert result["written"] == 5 and result["bad"] == 1
    states = open_target_store(str(tmp_path / "b" / "valid.tgt")).states()
    assert states[2] == BAD_AUDIO and (np.delete(states, 2) == WRITTEN).all()


@pytest.mark.slow
def test_command_line(data, tmp_path, clap_checkpoint):
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(data), "valid", "--checkpoint", clap_checkpoint, "--out", str(tmp_path / "o"),
         "--num-workers", "1", "--batch-size", "3"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # tqdm's bar reached all 6 clips and shows a measured rate (not the "?clip/s" of an empty bar)
    bar = r"valid shard 0/1: 100%\|[^\r\n]*\| 6/6 \[[^\]]*,\s*[0-9.]+clip/s\]"
    assert re.search(bar, proc.stderr), proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["written"] == 6
    bad = subprocess.run([sys.executable, SCRIPT, str(data), "valid", "--checkpoint", str(data / "valid.tsv"),
                          "--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert bad.returncode != 0 and "valid.tsv" in bad.stderr and "Traceback" not in bad.stderr


def test_ms_clap_layout_store(data, tmp_path):
    """MS-CLAP 2023: 7 s at 44.1 kHz; its bands sit where its 32 kHz filterbank lands in 44.1 kHz audio,
    and student patches after 7 s are not covered."""
    from mam_clap_fixtures.clap import save_random_clap_checkpoint

    ckpt = save_random_clap_checkpoint(str(tmp_path / "msclap.pt"), "msclap", seed=1, embed_dim=16,
                                       depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])
    assert run(data, "valid", ckpt, tmp_path / "out")["written"] == 6
    h = open_target_store(str(tmp_path / "out" / "valid.tgt")).header
    assert h.teacher.startswith("ms-clap-2023") and (h.sample_rate, h.seconds) == (44100, 7.0)
    assert h.freq_edges_hz[0] == pytest.approx(50 * 44100 / 32000)
    assert h.freq_edges_hz[-1] == pytest.approx(14000 * 44100 / 32000)
    covered = h.alignment(64, 8).covered.view(64, 8)[:, 0]
    assert covered.sum() == 44  # patch centres (t + 0.5) * 0.16 s below 7 s
