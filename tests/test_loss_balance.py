"""``python -m benchmarks.loss_balance`` shows the relations eq. 1's reductions must show.

At the tiny size, in process (seconds): the rows, the JSON report, and the relations."""
import json

import pytest

from benchmarks.loss_balance import main
from mam_clap_plugin.criterions.supmam_clap import CLAP_LOSSES


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss_balance") / "loss_balance.json"
    report = main(["--size", "tiny", "--batch-size", "2", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    return report


def rows(report, variant):
    return {r["clap_loss"]: r for r in report["rows"] if r["variant"] == variant}


def test_every_variant_and_reduction(report):
    assert [r["variant"] for r in report["rows"]] == ["mam"] + ["mam_clap"] * 4 + ["supmam"] + ["supmam_clap"] * 4
    for variant in ("mam_clap", "supmam_clap"):
        assert set(rows(report, variant)) == set(CLAP_LOSSES)
        assert [k for k, r in rows(report, variant).items() if r["default"]] == ["mse"]
    assert report["config"]["size"] == "tiny" and report["config"]["teacher_target_dim"] == 768
    assert report["command"].startswith("python -m benchmarks.loss_balance --size tiny")
    assert report["date"] and "cpu_model" in report["machine"]
    for line in ("| supmam_clap | `mse` (default) | 0.0001 |", "| supmam | pixel MSE (masked patches) | 0.01 |"):
        assert line in report["table"]


def test_branch_share_follows_the_reduction(report):
    """sum_sq is C = 768 times mse, value and gradient, so the branch's ratio is 768 times smaller;
    without a branch (MAM, MAM-CLAP) there is no ratio."""
    clap = rows(report, "supmam_clap")
    mse, sum_sq = clap["mse"], clap["sum_sq"]
    assert sum_sq["L_target"] == pytest.approx(768 * mse["L_target"], rel=1e-4)
    assert sum_sq["g_target"] == pytest.approx(768 * mse["g_target"], rel=1e-3)
    assert mse["cls_over_target"] == pytest.approx(768 * sum_sq["cls_over_target"], rel=1e-3)
    # LayerNorm'd prediction and target, independent at init: about 2 per channel in each set
    assert mse["loss_vis"] == pytest.approx(2.0, rel=0.1) and mse["loss_mask"] == pytest.approx(2.0, rel=0.1)
    assert 1e-3 < mse["cls_over_target"] < 1 and sum_sq["cls_over_target"] < 1e-4
    assert all(r["g_cls"] == clap["mse"]["g_cls"] > 0 for r in clap.values())  # one forward, one L_cls
    assert rows(report, "supmam")[None]["cls_over_target"] > 0.01
    for variant in ("mam", "mam_clap"):
        assert all(r["cls_over_target"] is None and r["g_cls"] is None for r in rows(report, variant).values())
