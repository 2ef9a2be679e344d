"""docs/teacher-training.md runs as written.

docs/teacher-training.md: its shell commands, read from the page itself, run verbatim (plus tiny
settings) from a scratch directory with relative paths, in the page's order: captions, tokenizer,
teacher training, zero-shot and retrieval, extraction from the trained teacher, SupMAM-CLAP from
its targets."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from mam_clap_plugin.data.target_store import open_target_store
from mam_clap_plugin.hydra_runs import parse_json_log, plugin_dir

from . import readme
from .conftest import REPO

pytestmark = pytest.mark.slow

PAGE = os.path.join(REPO, "docs", "teacher-training.md")
#: Settings a test adds to the page's fairseq-hydra-train commands (by config name), unless they set them.
FAST = {
    "clap": ["+size=tiny", "common.cpu=true", "common.log_interval=1", "dataset.batch_size=6", "dataset.num_workers=0",
             "optimization.max_update=6", "lr_scheduler.warmup_updates=1"],
    "supmam_clap": ["+size=tiny", "task.target_length=64", "common.cpu=true", "common.log_interval=1",
                    "dataset.batch_size=6", "dataset.num_workers=0", "optimization.max_update=2",
                    "optimization.update_freq=[1]", "lr_scheduler.warmup_updates=1",
                    "checkpoint.save_interval_updates=0"],
}


def page_commands() -> list:
    """The page's python and fairseq-hydra-train commands, block by block (python ones first in a block)."""
    text = open(PAGE, encoding="utf-8").read()
    found = []
    for block in re.findall(r"```bash\n.*?```", text, flags=re.S):
        for program in ("python", "fairseq-hydra-train"):
            found += readme.commands(block, program)
    return found


def with_fast(command: str) -> str:
    if not command.startswith("fairseq-hydra-train"):
        return command
    keys = readme.override_keys(command)
    fast = FAST[readme.config_name(command)]
    return " ".join([command, *(o for o in fast if o.split("=")[0].lstrip("+") not in keys)])


def test_page_commands_run_from_a_scratch_directory(tone_set, tmp_path):
    commands = page_commands()
    scripts = [c.split()[1] for c in commands if c.startswith("python ")]
    assert scripts == ["examples/teacher/captions.py", "examples/teacher/train_tokenizer.py",
                       "examples/teacher/zero_shot.py", "examples/prepare/extract_clap_targets.py",
                       "examples/prepare/extract_clap_targets.py"]
    assert [readme.config_name(c) for c in commands if c.startswith("fairseq")] == ["clap", "supmam_clap"]
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")
    shutil.copytree(tone_set, tmp_path / "manifests", ignore=shutil.ignore_patterns("targets"))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "USER_DIR": plugin_dir()}
    outputs, stdouts = [], []
    for command in commands:
        proc = subprocess.run(["bash", "-c", with_fast(command)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-3000:])
        outputs.append(proc.stdout + proc.stderr)
        stdouts.append(proc.stdout)
    assert (tmp_path / "manifests" / "train.cap").read_text().count(" ||| ") == 12  # 2 templates per clip
    assert (tmp_path / "manifests" / "spm.model").is_file()
    teacher_log = parse_json_log(outputs[2])
    assert [int(r["num_updates"]) for r in teacher_log["train_inner"]] == list(range(1, 7))
    assert "valid_mean_recall" in teacher_log["valid"][-1]
    assert (tmp_path / "checkpoints" / "clap" / "checkpoint_best.pt").is_file()
    assert stdouts[3].strip().splitlines()[-1].startswith("accuracy ")  # zero_shot.py's last line
    report = json.loads((tmp_path / "checkpoints" / "clap" / "zero_shot_valid.json").read_text())
    assert set(report["retrieval"]["recall"]) == {f"{d}_r{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)}
    header = open_target_store(str(tmp_path / "clap_targets" / "train.tgt")).header
    assert header.teacher.startswith("caption-clap-htsat-") and (header.grid_freq, header.grid_time) == (2, 32)
    assert header.seconds == 1.0
    pretrain = parse_json_log(outputs[-1])
    assert len(pretrain["train_inner"]) == 2 and "loss_vis" in pretrain["train_inner"][0]
    assert (tmp_path / "checkpoints" / "supmam_clap" / "checkpoint_last.pt").is_file()
