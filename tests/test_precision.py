"""Mixed precision (bf16, fp16, TF32) in the models, the teacher, extraction and training runs.

Every variant under bf16 autocast and under fairseq's model cast (losses and BatchNorm in
float32), fairseq's batch cast leaving targets and the teacher's waveform exact, the teacher's
float32 front end with a bf16 transformer, bf16 extraction against fp32, common.bf16 /
common.fp16 through fairseq-hydra-train, common.amp refused, TF32 for float32 GPU runs."""
import json
import os

import fairseq  # noqa: F401  (must be imported before the plugin's model modules)
import numpy as np
import pytest
import torch

import mam_clap_plugin  # noqa: F401
from mam_clap_plugin.criterions.supmam_clap import SupMamClapCriterion, SupMamClapCriterionConfig
from mam_clap_plugin.data.target_store import open_target_store
from mam_clap_plugin.hydra_runs import run_hydra_train
from mam_clap_plugin.models.supmam_clap import SupMamClapConfig, SupMamClapModel
from mam_clap_plugin.modules.precision import Fp32BatchNorm1d, carry_exact, exact
from mam_clap_plugin.optim import mam_clap_adamw
from mam_clap_plugin.teacher import load_clap_teacher

from .conftest import CONFIG_DIR, REPO

# variant: (model.target, classification branch, criterion.lambda_cls, mask ratio)
VARIANTS = {
    "mam": ("pixel", False, 0.0, 0.8),
    "mam_clap": ("clap", False, 0.0, 0.2),
    "supmam": ("pixel", True, 0.01, 0.4),
    "supmam_clap": ("clap", True, 1e-4, 0.2),
}
FRAMES, N, TARGET_DIM, K = 128, 64, 24, 5


def fairseq_batch_cast(sample, dtype):
    """fairseq's own cast of a batch under common.bf16 / common.fp16 (Trainer._fp_convert_sample)."""
    from types import SimpleNamespace

    from fairseq.trainer import Trainer

    common = SimpleNamespace(fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16)
    return Trainer._fp_convert_sample(SimpleNamespace(cfg=SimpleNamespace(common=common)), sample)


def variant_setup(name, seed=0):
    target, branch, lambda_cls, ratio = VARIANTS[name]
    torch.manual_seed(seed)
    model = SupMamClapModel(SupMamClapConfig(
        encoder_embed_dim=32, encoder_layers=2, encoder_attention_heads=4, max_frames=FRAMES, mask_ratio=ratio,
        decoder_embed_dim=32, decoder_layers=1, decoder_attention_heads=4, target=target,
        target_dim=TARGET_DIM if target == "clap" else 0, classification_branch=branch,
        num_classes=K if branch else 0, cls_hidden_dim=16))
    crit = SupMamClapCriterion(SupMamClapCriterionConfig(lambda_cls=lambda_cls), task=None)
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(4, 1, FRAMES, 128, generator=g)
    sample = {"id": torch.arange(4), "nsentences": 4, "net_input": {"source": source}}
    if target == "clap":
        sample["target"] = torch.randn(4, N, TARGET_DIM, generator=g).half()  # as the dataset delivers them
    if branch:
        sample["label"] = torch.nn.functional.one_hot(torch.arange(4) % K, K).float()
    return model, crit, sample


def loss_and_grads(model, crit, sample):
    torch.manual_seed(123)
    loss, _, log = crit(model, sample)
    model.zero_grad()
    loss.backward()
    return loss, log, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_under_bf16_autocast(name):
    model, crit, sample = variant_setup(name)
    loss32, _, grads32 = loss_and_grads(model, crit, sample)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, log, grads16 = loss_and_grads(model, crit, sample)
    assert loss16.dtype == torch.float32 and all(log[k].dtype == torch.float32 for k in log if k.startswith("loss"))
    assert torch.isfinite(loss16) and loss16.item() == pytest.approx(loss32.item(), rel=0.05)
    for n in grads32:
        assert torch.isfinite(grads16[n]).all(), n
    total32 = torch.cat([g.flatten() for g in grads32.values()])
    total16 = torch.cat([grads16[n].flatten() for n in grads32])
    assert torch.nn.functional.cosine_similarity(total16, total32, dim=0) > 0.98


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fairseq_model_cast_keeps_batchnorm_and_loss_float32(name, dtype):
    """fairseq's common.bf16/fp16 cast the model and the batch's float32 tensors; BatchNorm stays float32."""
    model, crit, sample = variant_setup(name)
    model = model.half() if dtype == torch.float16 else model.to(dtype)  # as fairseq's Trainer casts
    assert model.encoder.blocks[0].attn.qkv.weight.dtype == dtype
    sample = fairseq_batch_cast(sample, dtype)
    assert sample["net_input"]["source"].dtype == dtype
    bn = model.classifier.mlp[1] if model.classifier is not None else None
    if bn is not None:
        assert isinstance(bn, Fp32BatchNorm1d)
        assert all(t.dtype == torch.float32 for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
        before = bn.running_mean.clone()
    loss, log, grads = loss_and_grads(model, crit, sample)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    if bn is not None:
        assert bn.running_mean.dtype == torch.float32 and not torch.equal(bn.running_mean, before)


def test_fairseq_batch_cast_leaves_targets_and_teacher_waveform_exact(tone_set, clap_checkpoint):
    """Through the real task and dataset: fairseq's bf16 and fp16 batch casts change neither the offline
    targets (the store's float16 values) nor the online teacher's float32 waveform."""
    from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig, MamClapPretrainingTask

    offline = MamClapPretrainingTask.setup_task(MamClapPretrainingConfig(
        data=tone_set, target_store=os.path.join(tone_set, "targets"), target_length=64))
    offline.load_dataset("train")
    ds = offline.datasets["train"]
    batch = ds.collater([ds[0], ds[1]])
    assert batch["target"].dtype == torch.float16
    store = open_target_store(os.path.join(tone_set, "targets", "train.tgt"))
    stored = torch.from_numpy(np.array(store[0]))  # the teacher's own map, aligned on the device
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(fairseq_batch_cast(batch, dtype)["target"][0], stored)

    online = MamClapPretrainingTask.setup_task(MamClapPretrainingConfig(
        data=tone_set, teacher_checkpoint=clap_checkpoint, target_length=64))
    online.load_dataset("train")
    ds = online.datasets["train"]
    wav = torch.stack([ds[0]["teacher_wav"], ds[1]["teacher_wav"]])
    assert wav.dtype == torch.float32 and wav.abs().max() > 0
    batch = ds.collater([ds[0], ds[1]])
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(exact(fairseq_batch_cast(batch, dtype)["teacher_wav"]), wav)
    # common.bf16: the teacher's transformer under bf16 autocast, its float32 front end on the exact waveform
    target = online.online_targets(fairseq_batch_cast(batch, torch.bfloat16))["target"]
    assert online.teacher.autocast_dtype == torch.bfloat16 and target.dtype == torch.float32
    reference = online.online_targets(ds.collater([ds[0], ds[1]]))["target"]
    assert online.teacher.autocast_dtype is None
    assert not torch.equal(target, reference)
    assert torch.nn.functional.cosine_similarity(target, reference, dim=-1).min() >= 0.999


def test_carry_exact_round_trip():
    x = torch.randn(3, 5)
    assert carry_exact(x).dtype == torch.int32 and torch.equal(exact(carry_exact(x)), x)
    assert exact(x) is x
    with pytest.raises(TypeError):
        carry_exact(x.half())


# ----------------------------------------------------------------------------- teacher


def test_teacher_front_end_float32_transformer_bf16(clap_checkpoint, monkeypatch):
    teacher = load_clap_teacher(clap_checkpoint)
    wav = 0.1 * torch.randn(2, teacher.num_samples, generator=torch.Generator().manual_seed(0))
    ref = teacher(wav)
    seen = {}
    log_mel, encode = teacher.branch.log_mel, teacher.branch.encode

    def spy_log_mel(x):
        seen["front_end_input"] = x.dtype
        out = log_mel(x)
        seen["front_end_output"] = out.dtype
        return out

    def spy_encode(x):
        seen["autocast"] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        return encode(x)

    monkeypatch.setattr(teacher.branch, "log_mel", spy_log_mel)
    monkeypatch.setattr(teacher.branch, "encode", spy_encode)
    teacher.autocast_dtype = torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an ambient autocast does not reach the front end
        out = teacher(wav.bfloat16())
    assert seen == {"front_end_input": torch.float32, "front_end_output": torch.float32, "autocast": torch.bfloat16}
    assert out.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(out.flatten(0, 2), ref.flatten(0, 2), dim=-1)
    assert cos.min() > 0.99  # bf16 input waveform here; the extraction test below checks fp32 input


@pytest.mark.slow
def test_extraction_bf16_matches_fp32(tone_set, clap_checkpoint, tmp_path):
    """examples/prepare/extract_clap_targets.py --dtype bf16 against fp32: cosine >= 0.999 per token."""
    import subprocess
    import sys

    script = os.path.join(REPO, "examples", "prepare", "extract_clap_targets.py")
    stores = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        run = subprocess.run([sys.executable, script, tone_set, "valid", "--checkpoint", clap_checkpoint,
                              "--out", str(out), "--num-workers", "0", "--dtype", dtype, "--device", "cpu"],
                             capture_output=True, text=True, check=True)
        assert json.loads(run.stdout.strip().splitlines()[-1])["written"] == 6
        stores[dtype] = open_target_store(str(out / "valid.tgt"))
    a, b = (torch.from_numpy(np.stack([s[i] for i in range(len(s))]).astype(np.float32)).flatten(0, 2)
            for s in (stores["fp32"], stores["bf16"]))
    assert not torch.equal(a, b)  # the transformer did run in bf16
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() >= 0.999, cos.min()


# ----------------------------------------------------------------------------- fairseq-hydra-train

FAST = [
    "+size=tiny", "task.target_length=64", "common.cpu=true", "common.log_interval=1", "dataset.batch_size=6",
    "dataset.num_workers=0", "optimization.update_freq=[1]", "optimization.lr=[0.002]",
    "lr_scheduler.warmup_updates=1", "checkpoint.save_interval_updates=0", "optimization.max_update=3",
    "dataset.disable_validation=true",
]
PRECISION = {"bf16": ["common.bf16=true"], "fp16": ["common.fp16=true", "common.fp16_no_flatten_grads=true"]}


# SupMAM and SupMAM-CLAP hold every component (pixel and CLAP targets, both decoders, the
# BatchNorm branch, the target store); each run costs 10-25 s of fairseq start-up, so MAM and
# MAM-CLAP are covered by the model-level tests above (all four variants, both casts)
RUNS = [(v, p) for p in ("bf16", "fp16") for v in ("supmam", "supmam_clap")]


@pytest.mark.slow
@pytest.mark.parametrize("variant,precision", RUNS)
def test_variant_trains_in_mixed_precision(tone_set, tmp_path, variant, precision):
    args = [f"task.data={tone_set}", f"checkpoint.save_dir={tmp_path / 'ckpt'}", *FAST, *PRECISION[precision]]
    if "clap" in variant:
        args.append(f"task.target_store={os.path.join(tone_set, 'targets')}")
    run = run_hydra_train(CONFIG_DIR, variant, args, tmp_path / "run")
    losses = run.losses()
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    assert f"'{precision}': True" in run.text  # fairseq's logged config


@pytest.mark.slow
def test_amp_is_refused_with_the_reason(tone_set, tmp_path):
    args = [f"task.data={tone_set}", f"checkpoint.save_dir={tmp_path / 'ckpt'}", *FAST, "common.amp=true"]
    run = run_hydra_train(CONFIG_DIR, "mam", args, tmp_path / "run", check=False)
    assert run.returncode != 0
    assert "unscales the gradients twice" in run.text and "common.bf16=true" in run.text


@pytest.mark.parametrize("flags,expected", [({}, True), ({"bf16": True}, False), ({"fp16": True}, False)])
def test_optimizer_asks_for_tf32_in_float32_runs_only(monkeypatch, flags, expected):
    calls = []
    monkeypatch.setattr(mam_clap_adamw, "enable_tf32_matmuls", lambda device: calls.append(device))
    cfg = mam_clap_adamw.MamClapAdamWConfig(amp=False, fp16=flags.get("fp16", False), bf16=flags.get("bf16", False),
                                            lr=[1e-3])
    mam_clap_adamw.MamClapAdamW(cfg, [torch.nn.Parameter(torch.zeros(2, 2))])
    assert (calls == [torch.device("cpu")]) == expected and (calls == []) != expected


def test_tf32_for_float32_gpu_runs(monkeypatch):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not mam_clap_adamw.enable_tf32_matmuls(torch.device("cpu"))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        assert not mam_clap_adamw.enable_tf32_matmuls(torch.device("cuda"))  # V100: no TF32
        assert torch.get_float32_matmul_precision() == "highest"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "H200")
        assert mam_clap_adamw.enable_tf32_matmuls(torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_ieee_fp32_turns_tf32_off_on_cuda_only_and_restores_it():
    """The front end's resampler and mel projection run without TF32 on GPUs (cuDNN uses TF32 for
    float32 convolutions by default, and the plugin turns it on for matmuls in float32 runs); the
    settings come back after the block, also after an error. The flags can be set without a GPU."""
    from mam_clap_plugin.modules.precision import ieee_fp32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        with ieee_fp32(torch.device("cpu")):
            assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with pytest.raises(RuntimeError, match="inside"):
            with ieee_fp32(torch.device("cuda")):
                assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
                raise RuntimeError("inside")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
