"""Smoke runs of the pretraining benchmarks (benchmarks.bench_pretrain, benchmarks.training_loop).

``python -m benchmarks.bench_pretrain`` (student step, teacher and data path modules together)
and ``python -m benchmarks.training_loop``: tiny runs, and the JSON they write."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test reads benchmark runs in subprocesses
VARIANTS = ("mam", "mam_clap", "supmam", "supmam_clap")

VARIANT_FIELDS = (
    "params_m",
    "step_ms",
    "fwd_loss_bwd_ms",
    "optimizer_step_ms",
    "clips_per_s",
    "clips_per_s_per_core",
    "gflop_per_step",
    "achieved_gflops",
    "pct_of_matmul",
    "matmul_gflops",
    "pct_of_best_matmul",
    "cpu_utilisation_pct",
    "peak_rss_mib_so_far",
)


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "pretrain.json"
    cmd = [
        sys.executable, "-m", "benchmarks.bench_pretrain", "--size", "tiny", "--steps", "1", "--warmup", "1",
        "--batch-size", "2", "--matmul-sizes", "256", "512", "--adjacent-sizes", "256", "512", "--matmul-reps", "3",
        "--pipeline-clips", "1", "--pipeline-passes", "2",
        "--teacher-batch", "2", "--teacher-steps", "1", "--teacher-size", "small",
        "--out", str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "clips/s per core / model clips/s per core" in proc.stdout and "fbank_on_device" in proc.stdout  # the tables
    return json.loads(out.read_text())


def test_top_level_fields(report):
    assert report["complete"] is True
    assert report["config"]["size"] == "tiny" and report["config"]["batch_size"] == 2
    assert report["config"]["input_shape"] == [2, 1, 1024, 128]
    assert report["config"]["teacher_target_dim"] == 768 and "HTSAT-tiny" in report["config"]["teacher_target_dim_note"]
    assert report["config"]["num_classes"] == 527
    for key in ("peak_rss_mib", "wall_s"):
        assert positive_finite(report[key]), key
    m = report["machine"]
    assert m["torch"] and m["cpu_model"] and m["torch_threads"] >= 1
    mm = report["matmul_reference"]
    for key in ("gflops_by_size", "gflops_by_size_end"):
        assert set(mm[key]) == {"256", "512"}
        assert all(positive_finite(v) for v in mm[key].values())
    candidates = list(mm["gflops_by_size"].values()) + list(mm["gflops_by_size_end"].values())
    candidates += [g for v in report["variants"].values() for g in v["matmul_gflops_by_size"].values()]
    assert mm["best_gflops"] == max(candidates) and mm["best_source"]


def test_variant_fields(report):
    assert set(report["variants"]) == set(VARIANTS)
    for name, v in report["variants"].items():
        for key in VARIANT_FIELDS:
            assert positive_finite(v[key]), (name, key, v.get(key))
        assert len(v["step_ms_all"]) == 1
        assert isinstance(v["target_met"], bool) and isinstance(v["target_met_vs_best"], bool)
        assert v["target_pct"] == 85.0
        assert set(v["matmul_gflops_by_size"]) == {"256", "512"}
        assert v["matmul_gflops"] == max(v["matmul_gflops_by_size"].values())
        assert v["pct_of_matmul"] == pytest.approx(100 * v["achieved_gflops"] / v["matmul_gflops"])
        best = report["matmul_reference"]["best_gflops"]
        assert v["pct_of_best_matmul"] == pytest.approx(100 * v["achieved_gflops"] / best)
        assert v["pct_of_best_matmul"] <= v["pct_of_matmul"] + 1e-9
        assert v["clips_per_s"] == pytest.approx(2 / (v["step_ms"] / 1e3))
        top = v["profile"]["top_ops"]
        assert 1 <= len(top) <= 8
        assert all(positive_finite(o["share_pct"]) and positive_finite(o["self_cpu_ms_per_step"]) for o in top)
        assert sum(v["profile"]["groups_share_pct"].values()) == pytest.approx(100.0)
        for r in v["profile"]["kernel_rates"].values():
            assert r["pct_of_matmul"] == pytest.approx(100 * r["gflops"] / v["matmul_gflops"])


def test_variant_settings_come_from_the_yaml(report):
    v = report["variants"]
    # size/tiny.yaml on top of each variant file
    assert all(x["settings"]["model"]["encoder_embed_dim"] == 64 for x in v.values())
    assert v["mam"]["settings"]["target"] == "pixel" and v["mam"]["settings"]["mask_ratio"] == 0.8
    assert v["supmam"]["settings"]["classification_branch"] and v["supmam"]["settings"]["lambda_cls"] == 0.01
    assert v["mam_clap"]["settings"]["model"]["target_dim"] == 768
    assert v["supmam_clap"]["settings"]["model"]["num_classes"] == 527
    assert v["supmam_clap"]["settings"]["optimizer"]["lr"] == 2e-4


def test_flops_include_attention(report):
    """Encoder forward FLOPs = linear layers + patch conv + the CPU flash-attention kernel."""
    v = report["variants"]["mam_clap"]
    cfg = v["settings"]["model"]
    d, layers, batch = cfg["encoder_embed_dim"], cfg["encoder_layers"], 2
    n = v["visible_tokens"] + 1  # + cls
    hidden = int(d * cfg.get("mlp_ratio", 4.0))
    linear = 2 * batch * n * (d * 3 * d + d * d + 2 * d * hidden) * layers
    attention = 4 * batch * n * n * d * layers
    conv = 2 * batch * v["tokens"] * 256 * d
    assert v["gflop_forward_by_module"]["encoder"] * 1e9 == pytest.approx(linear + attention + conv, rel=1e-3)
    assert v["gflop_per_step"] > 2.5 * v["gflop_forward"]
    rates = v["profile"]["kernel_rates"]
    assert set(rates) == {"matmul (mm/addmm/bmm)", "attention kernel (sdpa)"}
    assert all(positive_finite(r["gflops"]) and positive_finite(r["pct_of_matmul"]) for r in rates.values())


def test_pipeline_fields(report):
    p = report["pipeline"]
    assert set(p["formats"]) == {"44k1_stereo", "48k_stereo", "16k_mono"}
    for fmt, f in p["formats"].items():
        assert positive_finite(f["clips_per_s_per_worker"]) and positive_finite(f["ms_per_clip"]), fmt
    assert set(p["ratio_to_model_per_core"]) == set(VARIANTS)
    assert all(positive_finite(r) for per in p["ratio_to_model_per_core"].values() for r in per.values())
    assert positive_finite(p["min_ratio"]) and isinstance(p["target_met"], bool)
    for key in ("all_variants_meet_matmul_target", "all_variants_meet_matmul_target_vs_best"):
        assert isinstance(report["summary"][key], bool)
    assert "against" in report["summary"]["matmul_target_verdict"]


def test_teacher_fields(report):
    t = report["teacher"]
    assert t["teacher"].startswith("laion-clap-htsat") and t["layer"] == "final" and t["grid"] == [2, 32]
    assert t["batch_size"] == 2 and t["clip_seconds"] == 10.0 and t["sample_rate"] == 48000
    assert positive_finite(t["clips_per_s"]) and t["clips_per_s"] == pytest.approx(2 / (t["batch_ms"] / 1e3))
    assert set(t["online_cost"]) == {"mam_clap", "supmam_clap"}
    for name, c in t["online_cost"].items():
        assert c["step_ms"] == report["variants"][name]["step_ms"]
        assert 0 < c["fraction_of_step"] < 1
        teacher_ms = c["teacher_ms_per_batch"]
        assert c["fraction_of_step"] == pytest.approx(teacher_ms / (teacher_ms + c["step_ms"]))


def test_pipeline_modes_devices_and_bytes(report):
    """The data path part: both modes per format, the device side, the loader's bytes per clip."""
    p = report["pipeline"]
    for fmt, f in p["formats"].items():
        for mode in ("fbank_in_worker", "fbank_on_device"):
            assert positive_finite(f[mode]["ms_per_clip"]) and positive_finite(f[mode]["clips_per_s_per_worker"]), fmt
        assert f["on_device_speedup"] == pytest.approx(
            f["fbank_on_device"]["clips_per_s_per_worker"] / f["fbank_in_worker"]["clips_per_s_per_worker"])
        assert f["fbank_in_worker"]["bytes_per_clip"]["input"] == 1024 * 128 * 4
    d = p["device_side"]
    assert d["batch_size"] >= 1 and positive_finite(d["resample_fbank_and_normalisation"]["ms_per_batch"])
    assert positive_finite(d["offline_target_alignment"]["ms_per_batch"])
    b = p["loader_bytes_per_clip"]
    assert b["offline_targets"] == b["store_bytes_per_clip"] == 2 * 32 * 768 * 2  # the store's fp16 map
    assert b["offline_targets_aligned_fp32_before"] == 512 * 768 * 4
    assert b["waveform"] == 441000 * 4 + 16  # 10 s at the file's own 44.1 kHz, float32; its length and rate
    assert p["offline_targets_target_met"] is True and isinstance(p["on_device_speedup_target_met"], bool)
    w = p["workers_needed"]
    assert w["for_assumed_gpu"]["44k1_stereo"]["fbank_on_device"] >= 1


def test_training_loop_next_to_the_isolated_step(tmp_path):
    """python -m benchmarks.training_loop, tiny: fairseq-hydra-train's own clips/s with a worker
    process, next to the isolated step at the same batch."""
    out = tmp_path / "loop.json"
    cmd = [sys.executable, "-m", "benchmarks.training_loop", "--size", "tiny", "--batch-size", "2", "--updates", "4",
           "--steps", "1", "--num-workers", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    loop = r["loop"]
    assert r["variant"] == "supmam_clap" and r["batch_size"] == 2 and loop["num_workers"] == 1
    assert loop["timed_updates"] == 3 and loop["bsz"] == 2
    assert all(x >= 0 for x in loop["wps_all"]) and positive_finite(loop["clips_per_s_wall"])
    assert loop["ms_in_train_step"] >= 0 and positive_finite(loop["ms_per_update_wall"])
    assert positive_finite(r["isolated_step"]["clips_per_s"])
    isolated = r["isolated_step"]["clips_per_s"]
    assert r["loop_pct_of_isolated"] == pytest.approx(100 * loop["clips_per_s_wall"] / isolated)
    assert "clips/s" in proc.stdout and isinstance(r["target_met"], bool)


def test_device_check_smoke_run_on_the_cpu(tmp_path):
    """python -m benchmarks.device_check at tiny sizes on the CPU (the GPU script's code path):
    every section runs and the report is complete; fbank_on_device matches the workers' fbank."""
    out = tmp_path / "device.json"
    cmd = [sys.executable, "-m", "benchmarks.device_check", "--device", "cpu", "--size", "tiny", "--batch", "2",
           "--steps", "1", "--warmup", "1", "--matmul-size", "256", "--teacher-batch", "1", "--upstream-batch", "1",
           "--fbank-batch", "3", "--fbank-clips", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["complete"] is True and not r["skipped"] and set(r["variants"]) == set(VARIANTS)
    for v in r["variants"].values():
        assert positive_finite(v["step_ms"]) and positive_finite(v["tflop_per_step"])
        assert isinstance(v["target_met"], bool)
    f = r["fbank_on_device"]
    assert f["batch"] == 3 and positive_finite(f["batch_ms"]) and f["parity_met"] is True
    assert 0 <= f["max_abs_diff_vs_workers"] <= 1e-4
    assert positive_finite(r["teacher"]["clips_per_s"]) and positive_finite(r["upstream"]["batch_ms"])
