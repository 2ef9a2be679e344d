"""The fused `mam_clap_adamw` optimizer against fairseq's `adam`, its resume and its refusals.

Groups from the per-parameter tags, fairseq `adam`'s update rule, exact resume, per-group lr
under the cosine scheduler and fairseq's fp16/bf16 wrappers, and the refused configurations
(flattened fp16, amp)."""
import io
import os
import subprocess
import sys

import fairseq  # noqa: F401  (must be imported before the plugin's model modules)
import pytest
import torch
from fairseq import optim, utils
from fairseq.optim.adam import Adam as FairseqAdamKernel
from fairseq.optim.lr_scheduler import build_lr_scheduler

import mam_clap_plugin  # noqa: F401  (registers mam_clap_adamw)
from mam_clap_plugin.models.supmam_clap import SupMamClapConfig, SupMamClapModel
from mam_clap_plugin.optim import param_groups, set_overrides
from mam_clap_plugin.optim.mam_clap_adamw import MamClapAdamW

from .helpers import LR, WD, build, full_cfg


def make_model(seed=0, lr_decay=False, branch=True):
    """Tiny pixel-target model, by default with the classification branch (BatchNorm included)."""
    torch.manual_seed(seed)
    model = SupMamClapModel(SupMamClapConfig(
        encoder_embed_dim=32, encoder_layers=2, encoder_attention_heads=4, max_frames=64, mask_ratio=0.5,
        decoder_embed_dim=32, decoder_layers=1, decoder_attention_heads=4, classification_branch=branch,
        num_classes=3, cls_hidden_dim=16))
    if lr_decay:  # layer-wise lr decay as the fine-tuning model tags it
        for depth, block in enumerate(model.encoder.blocks):
            for p in block.parameters():
                set_overrides(p, lr_scale=0.5 ** (len(model.encoder.blocks) - depth))
        set_overrides(model.encoder.patch_embed.weight, lr_scale=0.125)
    return model


def train_steps(model, opt, steps, start=0, dtype=torch.float32):
    """`steps` updates on fixed batches (masks seeded per update, as fairseq does)."""
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        source = torch.randn(4, 1, 64, 128, generator=g).to(dtype)
        torch.manual_seed(1000 + i)
        out = model(source)
        loss = (out["pred"].float() - out["patches"].float()).pow(2).mean()
        if out["logits"] is not None:
            loss = loss + out["logits"].float().pow(2).mean()
        opt.zero_grad()
        opt.backward(loss)
        opt.clip_grad_norm(0.0)
        opt.step()


def params_of(model):
    return [p.detach().float().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- groups


def test_groups_follow_tags():
    model = make_model()
    opt = build(full_cfg(), model)
    assert isinstance(opt, MamClapAdamW) and all(g["fused"] for g in opt.param_groups)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay) == sum(1 for _ in model.parameters())
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name in ("encoder.cls_token", "decoder.mask_token")
        assert decay[id(p)] == (0.0 if no_decay else WD), name
    # BatchNorm weights and biases, LayerNorms, biases: no decay; the position tables are buffers
    assert decay[id(model.classifier.mlp[1].weight)] == 0.0
    assert "encoder.pos_embed" in dict(model.named_buffers())


def test_set_overrides_merges_and_checks():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    set_overrides(p, lr_scale=0.5)
    set_overrides(p, weight_decay=0.0)
    assert p.optim_overrides == {"optimizer": {"lr_scale": 0.5, "weight_decay": 0.0}}
    with pytest.raises(ValueError, match="unknown optimizer override.*momentum"):
        set_overrides(p, momentum=0.9)
    with pytest.raises(ValueError, match="lr_scale=-1"):
        set_overrides(p, lr_scale=-1)
    q = torch.nn.Parameter(torch.zeros(2, 2))
    q.optim_overrides = {"optimizer": {"betas": (0.9, 0.9)}}
    with pytest.raises(ValueError, match="unknown optim_overrides.*betas"):
        param_groups([q], WD)


# ----------------------------------------------------------------------------- update rule


class TinyNet(torch.nn.Module):
    """A token, two Linears and a LayerNorm: no parameter whose gradient is structurally zero
    (unlike a ViT's key bias or a Linear before BatchNorm, which both optimizers move by noise)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.token = set_overrides(torch.nn.Parameter(0.1 * torch.randn(1, 1, 8)), weight_decay=0.0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x + self.token)


def tiny_steps(model, opt, steps, start=0):
    dtype = model.token.dtype
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(6, 5, 8, generator=g).to(dtype), torch.randn(6, 5, 4, generator=g)
        opt.zero_grad()
        opt.backward((model(x).float() - y).pow(2).mean())
        opt.step()


# fairseq's adam divides by sqrt(v) + eps, torch's AdamW by sqrt(v / bias_correction2) + eps:
# they agree wherever |grad| >> eps (here: 1e-8 against gradients of 1e-4 and more). The
# kernels round differently and Adam's first steps (~lr * sign(grad)) magnify that where a
# gradient changes sign: elements agree to 1% of one step (measured: at most 0.25%).
TOL = dict(rtol=0.0, atol=0.01 * LR)


def test_matches_fairseq_adam():
    """Without weight decay, fairseq's `adam` (one group) and mam_clap_adamw agree after 5 updates."""
    ref, ours, before = TinyNet(), TinyNet(), TinyNet()
    tiny_steps(ref, build(full_cfg("adam", weight_decay=0.0), ref), 5)
    opt = build(full_cfg(weight_decay=0.0), ours)
    assert type(opt).__name__ == "MamClapAdamW" and len(opt.param_groups) == 1  # no decay anywhere: one group
    tiny_steps(ours, opt, 5)
    for a, b, p0 in zip(params_of(ref), params_of(ours), params_of(before)):
        assert (a - p0).abs().max() > 2 * LR  # the updates moved it
        torch.testing.assert_close(b, a, **TOL)


def test_matches_fairseq_adam_kernel_with_decay_groups():
    """With decay, the update equals fairseq adam's kernel over the same no-decay groups."""
    ref, ours = TinyNet(), TinyNet()
    kernel = kernel_with_groups(list(ref.parameters()), WD)
    assert [g["weight_decay"] for g in kernel.param_groups] == [0.0, WD]  # token and 1-D tensors; the weights
    tiny_steps(ref, kernel, 5)
    tiny_steps(ours, build(full_cfg(), ours), 5)
    for a, b in zip(params_of(ref), params_of(ours)):
        torch.testing.assert_close(b, a, **TOL)


def test_clip_grad_norm_matches_fairseq_without_per_tensor_norms(monkeypatch):
    model = make_model()
    opt = build(full_cfg(), model)
    train_steps(model, opt, 1)
    opt.zero_grad()
    out = model(torch.randn(4, 1, 64, 128))
    opt.backward(out["pred"].pow(2).mean() + out["logits"].pow(2).mean())
    expected_grads = [p.grad.clone() for p in model.parameters()]
    copies = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected_grads]
    for c, g in zip(copies, expected_grads):
        c.grad = g.clone()
    expected_norm = utils.clip_grad_norm_(copies, 0)  # fairseq's: one norm per tensor
    calls = []
    norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: calls.append(1) or norm(*a, **k))
    monkeypatch.setattr(torch, "norm", lambda *a, **k: pytest.fail("per-tensor torch.norm"))
    total = opt.clip_grad_norm(0.0)
    assert len(calls) <= 1  # one reduction over the stacked per-tensor norms (foreach kernel)
    torch.testing.assert_close(total, expected_norm)
    torch.testing.assert_close(total, torch.linalg.vector_norm(torch.cat([g.flatten() for g in expected_grads])))
    # clipping to a tenth scales every gradient by the same coefficient
    total = opt.clip_grad_norm(float(expected_norm) / 10)
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g / 10, rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------- resume


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


PRECISION = {  # common.* flags and the model's dtype
    "fp32": ({}, torch.float32),
    "bf16": ({"bf16": True}, torch.bfloat16),
    "fp16": ({"fp16": True, "fp16_no_flatten_grads": True}, torch.float16),
}


@pytest.mark.parametrize("precision", sorted(PRECISION))
def test_exact_resume(precision):
    """3 updates, save, rebuild, load, 3 more == 6 uninterrupted (bitwise), through fairseq's wrappers,
    in fairseq's order: model weights loaded, optimizer built from them, optimizer state loaded."""
    common, dtype = PRECISION[precision]
    cfg = full_cfg(**common)

    def fresh(saved=None):
        model = make_model(lr_decay=True).to(dtype)
        if saved is not None:
            model.load_state_dict(saved["model"])
        opt = build(cfg, model)
        sched = build_lr_scheduler(cfg.lr_scheduler, opt)
        if saved is not None:
            opt.load_state_dict(saved["opt"], {})  # checkpoint.optimizer_overrides, default {}
            sched.load_state_dict(saved["sched"])
        return model, opt, sched

    def run(model, opt, sched, start, steps):
        for i in range(start, start + steps):
            train_steps(model, opt, 1, start=i, dtype=dtype)
            sched.step_update(i + 1)

    model, opt, sched = fresh()
    run(model, opt, sched, 0, 6)
    uninterrupted = params_of(model)

    model, opt, sched = fresh()
    run(model, opt, sched, 0, 3)
    saved = save_load({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    assert ("fp32_params" in saved["opt"]) == (precision != "fp32")
    model, opt, sched = fresh(saved)
    groups = opt.param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, WD}
    assert [g["lr"] for g in groups] == [opt.get_lr() * g["lr_scale"] for g in groups]
    run(model, opt, sched, 3, 3)
    for a, b in zip(uninterrupted, params_of(model)):
        assert torch.equal(a, b)


def test_lr_override_keeps_decay_groups():
    opt = build(full_cfg(), make_model())
    state = save_load(opt.state_dict())
    opt.load_state_dict(state, {"lr": 0.5, "weight_decay": 0.3})  # checkpoint.optimizer_overrides
    assert opt.get_lr() == 0.5 and {g["weight_decay"] for g in opt.param_groups} == {0.0, WD}
    assert sorted({g["lr"] for g in opt.param_groups}) == [0.5]


def kernel_with_groups(params, weight_decay):
    groups = param_groups(params, weight_decay)
    for g in groups:
        del g["indices"]
    adam = FairseqAdamKernel(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)

    class Wrapped(optim.FairseqOptimizer):  # fairseq's plain step/zero_grad around the kernel
        def __init__(self):
            super().__init__(None)
            self._optimizer = adam

    return Wrapped()


def test_resume_from_fairseq_adam_state():
    """fairseq adam's one-group state loads into mam_clap_adamw's groups (moments by position)
    and training continues as fairseq's adam kernel over the same groups and state would."""
    ref, ours = TinyNet(), TinyNet()
    ref_opt = build(full_cfg("adam", weight_decay=WD), ref)
    tiny_steps(ref, ref_opt, 3)
    saved = save_load(ref_opt.state_dict())
    ours.load_state_dict(ref.state_dict())
    opt = build(full_cfg(), ours)
    order = [n for g in opt.param_groups for p in g["params"] for n, q in ours.named_parameters() if q is p]
    assert order != [n for n, _ in ours.named_parameters()]  # the groups reorder the parameters
    opt.load_state_dict(saved, {})
    assert all(g["fused"] for g in opt.param_groups) and [g["weight_decay"] for g in opt.param_groups] == [0.0, WD]
    ref_state = {n: ref_opt.optimizer.state[p] for n, p in ref.named_parameters()}
    for n, p in ours.named_parameters():
        mine = opt.optimizer.state[p]
        assert float(mine["step"]) == ref_state[n]["step"] == 3
        assert torch.equal(mine["exp_avg"], ref_state[n]["exp_avg"])
        assert torch.equal(mine["exp_avg_sq"], ref_state[n]["exp_avg_sq"])
    # continue: fairseq's adam kernel over mam_clap_adamw's groups, from the same state
    kernel = kernel_with_groups(list(ref.parameters()), WD)
    for p in ref.parameters():
        kernel.optimizer.state[p] = ref_opt.optimizer.state[p]
    tiny_steps(ref, kernel, 3, start=3)
    tiny_steps(ours, opt, 3, start=3)
    for a, b in zip(params_of(ref), params_of(ours)):
        torch.testing.assert_close(b, a, **TOL)


def test_adam_state_loads_through_bf16_wrapper():
    """Under common.bf16 both optimizers are FP16Optimizer (fairseq's name check passes): adam's state loads."""
    cfg_adam, cfg_ours = full_cfg("adam", bf16=True), full_cfg(bf16=True)
    ref = TinyNet().to(torch.bfloat16)
    ref_opt = build(cfg_adam, ref)
    tiny_steps(ref, ref_opt, 2)
    ours = TinyNet().to(torch.bfloat16)
    ours.load_state_dict(ref.state_dict())
    opt = build(cfg_ours, ours)
    assert type(opt).__name__ == type(ref_opt).__name__ == "FP16Optimizer"
    opt.load_state_dict(save_load(ref_opt.state_dict()), {})
    ref_state = [ref_opt.optimizer.state[p] for p in ref_opt.fp32_params]
    by_param = {id(p): i for i, p in enumerate(opt.fp32_params)}
    for g in opt.param_groups:
        for p in g["params"]:
            mine, theirs = opt.optimizer.state[p], ref_state[by_param[id(p)]]
            assert float(mine["step"]) == theirs["step"] == 2 and torch.equal(mine["exp_avg"], theirs["exp_avg"])
    tiny_steps(ours, opt, 1, start=2)  # and it steps


def test_state_from_another_model_is_refused():
    opt = build(full_cfg(), make_model())
    other = torch.nn.Linear(3, 3)
    state = torch.optim.AdamW([{"params": [other.weight]}, {"params": [other.bias]}]).state_dict()
    with pytest.raises(ValueError, match="reset_optimizer=true"):
        opt.load_state_dict(state)


# ----------------------------------------------------------------------------- lr per group


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_group_lr_follows_cosine_schedule(precision):
    common = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True, "fp16_no_flatten_grads": True}}[precision]
    cfg = full_cfg(**common)
    model = make_model(lr_decay=True)
    if precision != "fp32":
        model = model.to(torch.float16 if precision == "fp16" else torch.bfloat16)
    opt = build(cfg, model)
    assert type(opt).__name__ == ("MamClapAdamW" if precision == "fp32" else "FP16Optimizer")
    groups = opt.param_groups  # the fp32 optimizer's groups, seen through the wrapper
    assert sorted({g["lr_scale"] for g in groups}) == [0.125, 0.25, 0.5, 1.0]
    assert {g["weight_decay"] for g in groups} == {0.0, WD}
    sched = build_lr_scheduler(cfg.lr_scheduler, opt)
    seen = []
    for update in range(8):
        lr = sched.step_update(update)
        assert opt.get_lr() == lr
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(lr * g["lr_scale"], rel=1e-12)
        seen.append(lr)
    assert seen[0] == pytest.approx(1e-7) and seen[4] == pytest.approx(LR)  # warmup, then cosine decay
    assert seen[4] > seen[5] > seen[6] > seen[7]


def test_flattened_fp16_is_refused(monkeypatch):
    cfg = full_cfg(fp16=True)  # fp16_no_flatten_grads=false: fairseq flattens
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # fairseq's flat buffer is keyed by CUDA device
    model = make_model(lr_decay=True).half()
    with pytest.raises(ValueError, match="common.fp16_no_flatten_grads=true"):
        build(cfg, model)


def test_amp_is_refused():
    cfg = full_cfg(amp=True)
    params = list(make_model().parameters())
    with pytest.raises(ValueError, match=r"unscales the gradients twice.*common\.bf16=true"):
        optim.AMPOptimizer.build_optimizer(cfg, params)


# ----------------------------------------------------------------------------- adam checkpoints, end to end

FAST = [
    "+size=tiny", "task.target_length=64", "common.cpu=true", "common.log_interval=1", "dataset.batch_size=6",
    "dataset.num_workers=0", "optimization.update_freq=[1]", "optimization.lr=[0.002]",
    "lr_scheduler.warmup_updates=1", "checkpoint.save_interval_updates=0", "optimization.max_update=4",
    "dataset.disable_validation=true",
]


@pytest.mark.slow
def test_adam_checkpoint_resumes_under_mam_clap_adamw(tone_set, tmp_path):
    """A run written with fairseq's adam: refused as is (fairseq's name check), resumed with its moments
    and schedule after adopt_adam, or restarted from update 0 with checkpoint.reset_optimizer=true."""
    from mam_clap_plugin.hydra_runs import run_hydra_train

    from .conftest import CONFIG_DIR

    save = tmp_path / "checkpoints" / "mam"  # the README's path for the relabelling command
    args = [f"task.data={tone_set}", f"checkpoint.save_dir={save}", *FAST]
    first = run_hydra_train(CONFIG_DIR, "mam", args + ["optimizer._name=adam", "optimization.max_epoch=1"],
                            tmp_path / "r1")
    assert "'_name': 'adam'" in first.text and "mam_clap_adamw" not in first.text
    assert [int(r["num_updates"]) for r in first.records["train_inner"]] == [1, 2]
    ckpt = str(save / "checkpoint_last.pt")

    refused = run_hydra_train(CONFIG_DIR, "mam", args, tmp_path / "r2", check=False)
    assert refused.returncode != 0 and "Optimizer does not match" in refused.text

    # the README's command, verbatim, from the run's directory
    from . import readme

    (command,) = [c for c in readme.commands(readme.section("## Optimizer"), "python") if "adopt_adam" in c]
    argv = readme.words(command, {"PATH": os.environ["PATH"]})
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = run_hydra_train(CONFIG_DIR, "mam", args, tmp_path / "r3")
    assert "@ 2 updates" in resumed.text and "mam_clap_adamw (fused)" in resumed.text
    assert [int(r["num_updates"]) for r in resumed.records["train_inner"]] == [3, 4]

    os.replace(ckpt + ".adam.bak", ckpt)
    restarted = run_hydra_train(CONFIG_DIR, "mam", args + ["checkpoint.reset_optimizer=true"], tmp_path / "r4")
    assert [int(r["num_updates"]) for r in restarted.records["train_inner"]][0] == 1  # moments and schedule restart
