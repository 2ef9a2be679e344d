"""The fine-tuning benchmark runs end to end at the tiny size and reports what the README quotes."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # a benchmark run in a subprocess


def test_bench_finetune_quick(tmp_path):
    out = tmp_path / "finetune.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_finetune", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    step = report["step"]
    assert step["visible_tokens"] == 51 * 6 and step["tokens"] == 512 and step["batch_size"] == 8
    assert step["step_ms"] > 0 and step["gflop_per_step"] > 0 and 0 < step["pct_of_matmul"]
    assert step["param_groups"] == 8  # 4 layer-decay scales (L = 2) x with / without weight decay
    assert report["evaluate"]["clips"] == 3 and report["evaluate"]["clips_per_s"] > 0
