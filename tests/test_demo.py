"""The demo's own checks, without running the demo: the loss must fall, the README must match the report.

The loss check is examples/demo/run_demo.py's; the README's demo section must state what the
demo's report holds (examples/demo/check_readme.py)."""
import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import REPO, load_script

run_demo = load_script("examples/demo/run_demo.py")
check_readme = load_script("examples/demo/check_readme.py")
CHECKER = os.path.join(REPO, "examples", "demo", "check_readme.py")


def _run(variant, first, last):
    return {"variant": variant, "loss_first": first, "loss_last": last}


@pytest.mark.parametrize("first,last,fails", [(1.2, 0.6, False), (1.2, 1.2, True), (1.2, 1.5, True),
                                              (1.2, math.nan, True), (math.inf, 3.0, False)])
def test_demo_fails_if_the_loss_does_not_fall(first, last, fails):
    report = {"pretrain": _run("supmam", first, last), "pretrain_clap": _run("supmam_clap", 3000.0, 40.0)}
    assert run_demo.losses_that_did_not_fall(report) == (["supmam"] if fails else [])
    report["pretrain_clap"]["loss_last"] = 3000.0
    assert run_demo.losses_that_did_not_fall(report) == (["supmam", "supmam_clap"] if fails else ["supmam_clap"])


def test_demo_fails_if_the_teacher_or_the_caption_run_does_not_learn():
    report = {"pretrain": _run("supmam", 1.2, 0.6), "pretrain_clap": _run("supmam_clap", 3000.0, 40.0),
              "caption_teacher": _run("caption_teacher", 3.5, 2.5),
              "pretrain_clap_caption": _run("supmam_clap", 2000.0, 30.0)}
    assert run_demo.losses_that_did_not_fall(report) == []
    report["caption_teacher"]["loss_last"] = 3.5
    report["pretrain_clap_caption"]["loss_last"] = math.nan
    assert run_demo.losses_that_did_not_fall(report) == ["caption_teacher", "supmam_clap"]


README = """# x

`make demo` writes `outputs/demo/report.json` (abridged):

```json
{"data": {...},
 "pretrain": {"variant": "supmam", "checkpoint": "outputs/demo/supmam/checkpoint_last.pt",
              "loss_first": 1.2424, "loss_fell": true, "num_updates": 1000, "seconds": 87.4, ...},
 "evaluate": {"linear_probe": {"supmam": 70.8, "random_init": 50.0}},
 "superb_ks": {"sizes": [1194, 114, ...], "table": ".../compare.md"},
 "seconds_total": 617.4}
```

The probe beats the random encoder.
<!-- check_readme: evaluate.linear_probe.supmam > evaluate.linear_probe.random_init -->
"""

REPORT = {
    "data": {"clips": 192},
    "pretrain": {"variant": "supmam", "checkpoint": "/home/u/mam-clap/outputs/demo/supmam/checkpoint_last.pt",
                 "loss_first": 1.24237, "loss_fell": True, "num_updates": 1000, "seconds": 12.0, "log": "x"},
    "evaluate": {"linear_probe": {"supmam": 70.83333333, "random_init": 50.0, "supmam_clap": 56.25}},
    "superb_ks": {"sizes": [1194, 114, 96], "table": "/tmp/o/superb_ks/compare/compare.md"},
    "seconds_total": 1.0,
}


def test_check_readme_agrees_with_a_matching_report():
    differences, compared = check_readme.check(REPORT, README)
    assert differences == []
    assert compared == 11  # every value shown except the two timings, and the claim


def test_check_readme_names_each_difference():
    report = json.loads(json.dumps(REPORT))
    report["evaluate"]["linear_probe"]["supmam"] = 72.9166  # the README's 70.8 is stale
    report["pretrain"]["loss_fell"] = False
    report["pretrain"]["checkpoint"] = "/x/other/checkpoint_last.pt"
    report["superb_ks"]["sizes"][1] = 115
    del report["pretrain"]["num_updates"]
    report["superb_ks"]["table"] = "/x/compare.json"
    differences, _ = check_readme.check(report, README, "README.md", "outputs/demo/report.json")
    assert differences == [
        'README.md:7: pretrain.checkpoint: README shows "outputs/demo/supmam/checkpoint_last.pt", '
        'outputs/demo/report.json has "/x/other/checkpoint_last.pt"',
        "README.md:8: pretrain.loss_fell: README shows true, outputs/demo/report.json has false",
        "README.md:8: pretrain.num_updates: README shows 1000, outputs/demo/report.json has no such entry",
        "README.md:9: evaluate.linear_probe.supmam: README shows 70.8, outputs/demo/report.json has 72.9166",
        "README.md:10: superb_ks.sizes.1: README shows 114, outputs/demo/report.json has 115",
        'README.md:10: superb_ks.table: README shows ".../compare.md", outputs/demo/report.json has "/x/compare.json"',
    ]
    # rounding: the README shows the report's value to the decimals it prints
    report = json.loads(json.dumps(REPORT))
    for value, ok in ((70.849, True), (70.751, True), (70.86, False), (70.74, False), (True, False), ("70.8", False)):
        report["evaluate"]["linear_probe"]["supmam"] = value
        assert (check_readme.check(report, README)[0] == []) is ok, value


def test_check_readme_checks_the_claims_of_the_text():
    report = json.loads(json.dumps(REPORT))
    report["evaluate"]["linear_probe"]["random_init"] = 75.0
    differences, _ = check_readme.check(report, README)
    assert differences == [
        "README.md:9: evaluate.linear_probe.random_init: README shows 50.0, report.json has 75.0",
        "README.md:15: claim evaluate.linear_probe.supmam > evaluate.linear_probe.random_init does not hold in "
        "report.json (70.83333333 > 75.0 is false): update the text",
    ]
    claims = "x\n<!-- check_readme: superb_ks.sizes.0 >= 1000 -->\n<!-- check_readme: pretrain.log < 3 -->\n"
    failed, count = check_readme.check_claims(REPORT, claims)
    assert count == 2 and failed == ["README.md:3: claim pretrain.log < 3: report.json has no number at pretrain.log"]


@pytest.mark.slow
def test_check_readme_command_line(tmp_path):
    (tmp_path / "README.md").write_text(README)
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    ok = subprocess.run([sys.executable, CHECKER, "report.json", "README.md"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "matches report.json (11 values)" in ok.stdout
    stale = json.loads(json.dumps(REPORT))
    stale["evaluate"]["linear_probe"]["supmam"] = 72.9
    (tmp_path / "report.json").write_text(json.dumps(stale))
    bad = subprocess.run([sys.executable, CHECKER, "report.json", "README.md"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "README.md:9: evaluate.linear_probe.supmam: README shows 70.8, report.json has 72.9" in bad.stderr
    assert "1 of 11 values in the demo section of README.md differ from report.json" in bad.stderr
    (tmp_path / "README.md").write_text("# no demo section\n")
    missing = subprocess.run([sys.executable, CHECKER, "report.json", "README.md"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no ```json block" in missing.stderr
    (tmp_path / "README.md").write_text(README.replace('"loss_fell": true', '"loss_fell" true'))
    broken = subprocess.run([sys.executable, CHECKER, "report.json", "README.md"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode == 2 and "README.md:8: expected : in the report block" in broken.stderr


def test_the_repository_readme_has_a_checkable_demo_block():
    """The real README's block parses and shows the demo's headline figures."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text, first = check_readme.find_block(f.read())
    paths = {leaf.path for leaf in check_readme.parse_leaves(text, first)}
    assert {("evaluate", "linear_probe", "supmam"), ("evaluate", "linear_probe", "random_init"),
            ("pretrain", "loss_first"), ("pretrain", "loss_last"),
            ("superb_ks", "supmam_clap_local", "test_acc")} <= paths
    # the text's claims hold for the figures the block shows (a report holding exactly those)
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    failed, claims = check_readme.check_claims(check_readme.shown_report(text, first), readme)
    assert claims >= 3 and failed == []


def test_a_new_demo_run_removes_the_previous_one(tmp_path, capsys):
    """A second `make demo` must train from scratch (fairseq would resume the finished runs and
    train nothing); only the demo's own outputs go, anything else in --out-dir stays."""
    for name in run_demo.DEMO_OUTPUTS:
        if name.endswith(".json"):
            (tmp_path / name).write_text("{}")
        else:
            (tmp_path / name / "checkpoints").mkdir(parents=True)
            (tmp_path / name / "checkpoints" / "checkpoint_last.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "linked")
    assert run_demo.clear_previous_run(str(tmp_path)) == list(run_demo.DEMO_OUTPUTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "linked", "notes.txt"]
    assert "removed the previous demo run's data, supmam" in capsys.readouterr().out
    assert run_demo.clear_previous_run(str(tmp_path)) == []
