"""The learning-rate sweep of examples/superb/compare_upstreams.py (--lrs) with real s3prl runs.

A sweep per upstream with real s3prl trainings (subprocesses through upstream/run_downstream.py,
as in test_superb.py): 2 learning rates, 4 steps, on the tiny generated keyword set, for a
converted AudioMAE file listed as ``audiomae=supmam_clap_local:FILE`` (s3prl's own entries such
as fbank are listed the same way; test_superb.py runs one), twice with the same seed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from .audiomae import audiomae_encoder
from .conftest import REPO, load_script

COMPARE = Path(REPO) / "examples" / "superb" / "compare_upstreams.py"
cu = load_script("examples/superb/compare_upstreams.py")


def compare(tmp_path, data, out, *upstreams):
    cmd = [sys.executable, str(COMPARE), "--data", str(data), "--out-dir", str(tmp_path / out),
           *[a for u in upstreams for a in ("--upstream", u)], "--lrs", "1e-2,1e-3",
           "--device", "cpu", "--threads", "1", "--total-steps", "4", "--eval-step", "2",
           "--batch-size", "8", "--num-workers", "0", "--seed", "7"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((tmp_path / out / "compare.json").read_text()), \
        (tmp_path / out / "compare.md").read_text()


def rows(md, label):
    return [line for line in md.splitlines() if line.startswith(f"| {label} |")]


@pytest.mark.slow
def test_lr_sweep_chooses_on_dev_and_repeats(keywords, tmp_path):
    data, _ = keywords
    save_file(audiomae_encoder(32, 2), str(tmp_path / "timm.safetensors"))
    from mam_clap_plugin.convert import convert_audiomae

    convert_audiomae(str(tmp_path / "timm.safetensors"), str(tmp_path / "audiomae.safetensors"), num_heads=4)
    spec = f"audiomae=supmam_clap_local:{tmp_path / 'audiomae.safetensors'}"
    stdout, summary, md = compare(tmp_path, data, "a", spec)
    assert summary["settings"]["lrs"] == ["1e-2", "1e-3"]
    for label, r in summary["results"].items():
        assert "error" not in r, r
        runs = r["runs"]
        assert [run["lr"] for run in runs] == ["1e-2", "1e-3"]
        for run in runs:
            assert [h[0] for h in run["dev_history"]] == [2, 4]
            assert run["train_cmd"][-1].endswith(f"config.optimizer.lr={float(run['lr'])!r}")
            assert Path(run["expdir"]).name == f"lr_{run['lr']}"
        # the best dev accuracy wins, ties go to the lr listed first
        best = max(run["dev_best_acc"] for run in runs)
        assert r["chosen_lr"] == next(run["lr"] for run in runs if run["dev_best_acc"] == best)
        chosen = next(run for run in runs if run["lr"] == r["chosen_lr"])
        assert r["dev_best_acc"] == chosen["dev_best_acc"] and r["expdir"] == chosen["expdir"]
        # test is evaluated once, on the chosen run, and is s3prl's own record
        assert [Path(run["expdir"], "evaluate.log").exists() for run in runs] == [run is chosen for run in runs]
        log = Path(chosen["expdir"], "log.log").read_text().splitlines()
        tests = [float(line.split(": ")[1]) for line in log if line.startswith("test at step 0: ")]
        assert len(tests) == 1 and round(100 * tests[0], 2) == r["test_acc"] == chosen["test_acc"]
        assert f"{label}: test acc {r['test_acc']:.2f}% at the chosen lr {r['chosen_lr']}" in stdout
        main_row, *run_rows = rows(md, label)
        assert main_row.split(" | ")[2] == r["chosen_lr"] and len(run_rows) == 2
        assert [row.split(" | ")[1] for row in run_rows] == ["1e-2", "1e-3"]
        assert sum(row.endswith("| yes |") for row in run_rows) == 1
    assert summary["results"]["audiomae"]["ckpt"] == str(tmp_path / "audiomae.safetensors")
    assert rows(md, "audiomae")[0].startswith("| audiomae | audiomae.safetensors | ")
    png = (tmp_path / "a" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the same seed gives the same table (in another out dir)
    _, again, md_again = compare(tmp_path, data, "b", spec)
    assert md_again == md
    strip = ("expdir", "train_cmd", "eval_cmd", "eval_ckpt", "train_seconds", "eval_seconds")
    same = [{k: v for k, v in run.items() if k not in strip} for run in again["results"]["audiomae"]["runs"]]
    assert same == [{k: v for k, v in run.items() if k not in strip} for run in summary["results"]["audiomae"]["runs"]]


def test_lr_arguments():
    assert cu.parse_lrs("1e-2, 1e-3,1e-4") == ["1e-2", "1e-3", "1e-4"]
    for bad, msg in (("1e-2,x", "bad learning rate 'x'"), ("1e-3,0.001", "listed twice"), ("-1", "positive"),
                     (",", "empty")):
        with pytest.raises(ValueError, match=msg):
            cu.parse_lrs(bad)
    assert cu.config_lr(cu.DEFAULT_CONFIG) == "0.0001"
    # ties go to the lr listed first; failed runs and runs without dev evaluations are not chosen
    runs = [{"lr": "a", "error": "x"}, {"lr": "b", "dev_best_acc": 50.0}, {"lr": "c", "dev_best_acc": 50.0},
            {"lr": "d"}]
    assert cu.choose(runs)["lr"] == "b"
    assert cu.choose([{"lr": "a", "error": "x"}]) is None
