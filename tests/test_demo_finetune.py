"""The demo's fine-tuning stage on its own (tiny settings), through fairseq-hydra-train.

A pretrained and a random encoder fine-tune and report finetune.<encoder>.accuracy."""
import os
import runpy

import pytest

from .conftest import REPO
from .helpers import save_pretraining_checkpoint

pytestmark = pytest.mark.slow  # fine-tunes through fairseq-hydra-train


def test_demo_finetune_stage(tone_set, tmp_path):
    demo = runpy.run_path(os.path.join(REPO, "examples", "demo", "run_demo.py"))
    ckpt = str(tmp_path / "supmam.pt")
    save_pretraining_checkpoint(ckpt)
    out = demo["finetune"](tone_set, str(tmp_path / "demo"), (-6.0, 5.0), {"supmam": ckpt}, seed=0, max_update=4,
                           batch_size=6)
    for name in ("supmam", "random_init"):
        assert 0 <= out[name]["accuracy"] <= 100
        assert os.path.isfile(out[name]["checkpoint"])
    assert out["supmam"]["encoder"] == ckpt and out["random_init"]["encoder"] is None
    assert out["schedule"]["max_update"] == 4 and out["seconds"] > 0
