"""The caption teacher's training-step benchmark runs at the tiny size.

The caption teacher's training-step benchmark runs end to end at the tiny size (`make bench` runs
the paper and tiny sizes) and reports clips/s and the share of the matmul rate."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_bench_teacher_quick(tmp_path):
    out = tmp_path / "teacher.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_teacher", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (size,) = report["sizes"]
    tiny = report["sizes"]["tiny"]
    assert size == "tiny" and tiny["config"] == "examples/teacher/config/clap.yaml +size=tiny"
    assert tiny["audio"]["audio_depths"] == [1, 1, 1] and tiny["batch_size"] == 4
    # one clip: the frozen STFT of 10 s at 48 kHz alone is 2 x 1001 frames x 1026 x 1024 FLOPs
    assert tiny["gflop_per_clip"] > 2.1 and tiny["clips_per_s"] > 0 and 0 < tiny["pct_of_matmul"] < 100
    assert "clips/s" in proc.stdout and "% of torch.mm" in proc.stdout
