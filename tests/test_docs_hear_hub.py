"""docs/hear-and-hub.md runs as written.

docs/hear-and-hub.md runs as written: its shell commands, run verbatim in a scratch folder that
holds a real fairseq-hydra-train checkpoint at the demo's path, ``clips/`` and ``examples/``
(linked in, as in a checkout), then its Python blocks in the same folder. Commands that need the
network or the HEAR kit are the only ones not run, and the page says so next to each."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from . import readme
from .conftest import PRETRAINED_DEPTH, PRETRAINED_DIM, REPO

PAGE = os.path.join(REPO, "docs", "hear-and-hub.md")
NOT_RUN = "(not run here)"


def page() -> str:
    with open(PAGE, encoding="utf-8") as f:
        return f.read()


def test_every_command_is_run_or_marked():
    """Each shell command either runs in the test below (``python ...``) or says why not."""
    lines = readme.command_lines(page())
    run = [c for c, comment in lines if NOT_RUN not in comment]
    assert run == readme.commands(page(), "python") and len(run) == 2
    skipped = [(c, comment) for c, comment in lines if NOT_RUN in comment]
    assert {c.split()[0] for c, _ in skipped} == {"pip", "hear-validator", "python3", "hf"}
    for command, comment in skipped:
        assert re.search(r"needs the (network|HEAR (kit|validator))", comment), command
        if command.startswith("python3 -m heareval"):
            assert "mam_clap_plugin.hear" in command


@pytest.mark.slow
def test_page_runs_verbatim(pretraining_checkpoint, tmp_path, monkeypatch):
    demo = tmp_path / "outputs" / "demo" / "supmam" / "checkpoints"
    demo.mkdir(parents=True)
    shutil.copy(pretraining_checkpoint, demo / "checkpoint_last.pt")
    (tmp_path / "clips").mkdir()
    rng = np.random.default_rng(0)
    for name, seconds in (("dog.wav", 0.7), ("rain.wav", 11.0)):
        sf.write(str(tmp_path / "clips" / name), (0.1 * rng.standard_normal(int(seconds * 16000))), 16000)
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    for command in readme.commands(page(), "python"):
        argv = readme.words(command, {"PATH": os.environ["PATH"]})
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    folder = tmp_path / "mam-clap-encoder"
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    for name, seconds in (("dog.wav", 0.7), ("rain.wav", 11.0)):
        frames = np.load(tmp_path / "feats" / f"{name}.npy")
        assert frames.shape == (len(range(0, int(seconds * 16000), 2560)), PRETRAINED_DIM)
    # the Python blocks, in order, in the same folder (the one that pushes to the Hub is not run)
    blocks = re.findall(r"```python\n(.*?)```", page(), flags=re.S)
    runnable = [b for b in blocks if "needs the network" not in b]
    assert len(blocks) == 3 and len(runnable) == 2
    monkeypatch.chdir(tmp_path)
    scope = {}
    for block in runnable:
        exec(block, scope)
    assert scope["clip"].shape == (PRETRAINED_DIM,)
    model = scope["model"]
    assert model.sample_rate == 16000 and model.scene_embedding_size == PRETRAINED_DIM
    assert scope["scene"].shape == (2, PRETRAINED_DIM)
    assert scope["embeddings"].shape == (2, 19, PRETRAINED_DIM) and scope["timestamps"].shape == (2, 19)
    assert scope["timestamps"][0, :2].tolist() == [87.5, 247.5]
    every = scope["hear"].load_model("mam-clap-encoder", layer="all", freq_pool="concat")
    assert every.scene_embedding_size == (PRETRAINED_DEPTH + 1) * PRETRAINED_DIM
    assert every.timestamp_embedding_size == (PRETRAINED_DEPTH + 1) * 8 * PRETRAINED_DIM
    assert torch.is_tensor(scope["audio"])
