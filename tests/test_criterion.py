"""Tests for the supmam_clap criterion: the loss terms (eqs. 1-3) and the logged metrics."""
import math
import re

import fairseq  # noqa: F401  (must be imported before the plugin's model/criterion modules)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.nan_detector import NanDetector
from sklearn.metrics import average_precision_score

from mam_clap_plugin.criterions.supmam_clap import (
    SupMamClapCriterion,
    SupMamClapCriterionConfig,
    clap_target_loss,
    normalize_tokens,
    reconstruction_loss,
    soft_cross_entropy,
)
from mam_clap_plugin.models.supmam_clap import SupMamClapConfig, SupMamClapModel

D = 32
K = 5
TARGET_DIM = 24
FRAMES = 128  # 8 x 8 = 64 patches
N = 64


# ----------------------------------------------------------------------------- loss functions


PRED = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0], [0.5, 0.5]]])
TARGET = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.5, -0.5]]])
MASK = torch.tensor([[False, True, True, False]])
# squared distance per token: 1+4=5, 1+1=2, 4+4=8, 0+1=1; visible tokens 0, 3; masked tokens 1, 2
BY_HAND = {
    "sum_sq": ((5 + 1) / 2, (2 + 8) / 2),
    "mse": ((5 / 2 + 1 / 2) / 2, (2 / 2 + 8 / 2) / 2),  # averaged over the 2 channels
    "l2": ((math.sqrt(5) + 1) / 2, (math.sqrt(2) + math.sqrt(8)) / 2),
    "set_l2": (math.sqrt(5 + 1) / 2, math.sqrt(2 + 8) / 2),  # ||Y - T|| over the set / its count
}


@pytest.mark.parametrize("kind", sorted(BY_HAND))
def test_clap_target_loss_by_hand(kind):
    loss_vis, loss_mask = clap_target_loss(PRED, TARGET, MASK, kind=kind)
    assert loss_vis.item() == pytest.approx(BY_HAND[kind][0], rel=1e-6)
    assert loss_mask.item() == pytest.approx(BY_HAND[kind][1], rel=1e-6)


def test_clap_target_loss_default_is_mse():
    assert SupMamClapCriterionConfig().clap_loss == "mse"
    torch.testing.assert_close(torch.stack(clap_target_loss(PRED, TARGET, MASK)),
                               torch.stack(clap_target_loss(PRED, TARGET, MASK, kind="mse")))
    with pytest.raises(ValueError, match="clap_loss='huber'"):
        clap_target_loss(PRED, TARGET, MASK, kind="huber")


def _loop_losses(pred, target, mask, keep, kind):
    """Eq. 1 with plain Python loops over clips and tokens."""
    B, n, C = pred.shape
    out = []
    for want_masked in (False, True):
        per_token, per_clip = [], []
        for b in range(B):
            clip = []
            for i in range(n):
                if bool(mask[b, i]) != want_masked or (keep is not None and not keep[b, i]):
                    continue
                d = sum((pred[b, i, c].item() - target[b, i, c].item()) ** 2 for c in range(C))
                clip.append(d)
                per_token.append({"sum_sq": d, "mse": d / C, "l2": math.sqrt(d)}.get(kind, d))
            if clip:
                per_clip.append(math.sqrt(sum(clip)) / len(clip))
        if kind == "set_l2":
            out.append(sum(per_clip) / len(per_clip) if per_clip else 0.0)
        else:
            out.append(sum(per_token) / len(per_token) if per_token else 0.0)
    return out


@pytest.mark.parametrize("kind", sorted(BY_HAND))
def test_clap_target_loss_against_loop(kind):
    g = torch.Generator().manual_seed(0)
    B, n, C = 3, 10, 6
    pred, target = torch.randn(B, n, C, generator=g), torch.randn(B, n, C, generator=g)
    mask = torch.rand(B, n, generator=g) < 0.3
    mask[0, 0], mask[0, 1] = True, False  # both sets non-empty
    keep = torch.rand(B, n, generator=g) < 0.8
    keep[2] = False  # a clip with no kept token: out of both sets (and of set_l2's clip average)
    for k in (None, keep):
        loss_vis, loss_mask = clap_target_loss(pred, target, mask, k, kind=kind)
        want_vis, want_mask = _loop_losses(pred, target, mask, k, kind)
        assert loss_vis.item() == pytest.approx(want_vis, rel=1e-5)
        assert loss_mask.item() == pytest.approx(want_mask, rel=1e-5)
    # an empty set contributes 0, not NaN
    lv, lm = clap_target_loss(pred, target, torch.ones(B, n, dtype=torch.bool), kind=kind)
    assert lv.item() == 0.0 and math.isfinite(lm.item())
    lv, lm = clap_target_loss(pred, target, torch.zeros(B, n, dtype=torch.bool), kind=kind)
    assert lm.item() == 0.0 and math.isfinite(lv.item())


@pytest.mark.parametrize("kind", sorted(BY_HAND))
def test_clap_target_loss_leaves_out_padding(kind):
    keep = torch.tensor([[True, False, True, False]])  # tokens 1 and 3 are padding
    # visible: token 0 only (5); masked: token 2 only (8)
    want = {"sum_sq": (5, 8), "mse": (2.5, 4), "l2": (math.sqrt(5), math.sqrt(8)),
            "set_l2": (math.sqrt(5), math.sqrt(8))}[kind]
    loss_vis, loss_mask = clap_target_loss(PRED, TARGET, MASK, keep, kind=kind)
    assert loss_vis.item() == pytest.approx(want[0]) and loss_mask.item() == pytest.approx(want[1])
    # a left-out token's target (even NaN) enters neither the loss nor its gradient
    pred = PRED.clone().requires_grad_(True)
    target = TARGET.clone()
    target[0, 1] = float("nan")
    target[0, 3] = float("inf")
    lv, lm = clap_target_loss(pred, target, MASK, keep, kind=kind)
    assert lv.item() == pytest.approx(want[0]) and lm.item() == pytest.approx(want[1])
    (lv + lm).backward()
    assert torch.isfinite(pred.grad).all() and not pred.grad[0, 1].any() and not pred.grad[0, 3].any()
    with pytest.raises(ValueError, match=r"target \(1, 4, 3\) differ"):
        clap_target_loss(PRED, torch.zeros(1, 4, 3), MASK)


def test_clap_target_loss_sqrt_kinds_have_finite_gradients_at_zero():
    """l2 and set_l2 take square roots: a perfect prediction gives a finite (zero) gradient."""
    for kind in ("l2", "set_l2"):
        pred = TARGET.clone().requires_grad_(True)
        lv, lm = clap_target_loss(pred, TARGET, MASK, kind=kind)
        (lv + lm).backward()
        assert torch.isfinite(pred.grad).all(), kind


def test_normalize_tokens():
    x = torch.randn(2, 5, 16) * 3 + 7
    y = normalize_tokens(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-4, rtol=0)


def test_reconstruction_loss_by_hand():
    patches = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 9.0], [0.0, 2.0, 0.0, 2.0]]])
    pred = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]])
    mask = torch.tensor([[True, False, True]])
    # norm_pix off: MSE of patch 0 = (1+4+9+16)/4 = 7.5, patch 2 = (1+1+1+1)/4 = 1 -> mean 4.25
    assert reconstruction_loss(pred, patches, mask, norm_pix=False).item() == pytest.approx(4.25)
    # norm_pix on: patch 0 -> mean 2.5, unbiased var 5/3; patch 2 -> mean 1, unbiased var 4/3
    # MSE(0, normalised patch) = mean of squares of the normalised patch = (sum sq dev / var) / 4 = 3 / 4
    # (sum of squared deviations over the unbiased variance is n - 1 = 3); patch 2: (1 - z)^2 with z = +-sqrt(3/4)
    z0 = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3 + 1e-6)
    z2 = (torch.tensor([0.0, 2.0, 0.0, 2.0]) - 1.0) / math.sqrt(4 / 3 + 1e-6)
    mse0 = (z0**2).mean().item()
    mse2 = ((1 - z2) ** 2).mean().item()
    assert mse0 == pytest.approx(0.75, rel=1e-5)
    assert mse2 == pytest.approx(1 + 0.75, rel=1e-5)  # cross terms cancel: mean(z) = 0
    assert reconstruction_loss(pred, patches, mask, norm_pix=True).item() == pytest.approx((mse0 + mse2) / 2, rel=1e-5)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_loss_against_loop(norm_pix):
    g = torch.Generator().manual_seed(1)
    B, n, P = 2, 6, 16
    pred, patches = torch.randn(B, n, P, generator=g), 3 * torch.randn(B, n, P, generator=g) + 1
    mask = torch.tensor([[True, False, True, True, False, False], [False, False, False, False, True, False]])
    errs = []
    for b in range(B):
        for i in range(n):
            if not mask[b, i]:
                continue
            t = patches[b, i].double().numpy()
            if norm_pix:
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
            errs.append(float(np.mean((pred[b, i].double().numpy() - t) ** 2)))
    loss = reconstruction_loss(pred, patches, mask, norm_pix)
    assert loss.item() == pytest.approx(np.mean(errs), rel=1e-5)

    # only masked patches count: changing a visible patch's prediction leaves the loss alone
    pred2 = pred.clone()
    pred2[0, 1] += 100.0
    pred2[1, 0] -= 50.0
    assert reconstruction_loss(pred2, patches, mask, norm_pix).item() == pytest.approx(loss.item(), rel=1e-6)
    pred3 = pred.clone()
    pred3[1, 4] += 1.0
    assert reconstruction_loss(pred3, patches, mask, norm_pix).item() != pytest.approx(loss.item(), rel=1e-4)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_soft_cross_entropy_single_label(tau):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, K, generator=g)
    y = torch.tensor([0, 3, 4, 1])
    one_hot = F.one_hot(y, K).float()
    expected = F.cross_entropy(logits / tau, y)
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot, tau), expected)
    # tau scales the logits
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot, tau), soft_cross_entropy(logits / tau, one_hot, 1.0))


def test_soft_cross_entropy_multi_label_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    row0 = -(0.5 * (1 - lse) + 0.5 * (3 - lse))  # targets normalised to (1/2, 0, 1/2)
    row1 = math.log(3)  # uniform logits, one label
    assert soft_cross_entropy(logits, labels, 1.0).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # with tau = 0.5 the logits double
    lse2 = math.log(math.exp(2) + math.exp(4) + math.exp(6))
    row0_t = -(0.5 * (2 - lse2) + 0.5 * (6 - lse2))
    assert soft_cross_entropy(logits, labels, 0.5).item() == pytest.approx((row0_t + row1) / 2, rel=1e-6)
    # label values are normalised per row: (2, 0, 2) is the same as (1, 0, 1)
    assert soft_cross_entropy(logits, 2 * labels, 1.0).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


# ----------------------------------------------------------------------------- criterion


def make_model(target="clap", branch=True, seed=0, mask_ratio=0.5, visible="decoder"):
    torch.manual_seed(seed)
    cfg = SupMamClapConfig(
        visible_prediction=visible,
        encoder_embed_dim=D, encoder_layers=1, encoder_attention_heads=4, max_frames=FRAMES, mask_ratio=mask_ratio,
        decoder_embed_dim=D, decoder_layers=1, decoder_attention_heads=4, target=target,
        target_dim=TARGET_DIM if target == "clap" else 0, classification_branch=branch,
        num_classes=K if branch else 0, cls_hidden_dim=16,
    )
    return SupMamClapModel(cfg)


def make_criterion(lambda_cls=0.0, tau=1.0, **kw):
    return SupMamClapCriterion(SupMamClapCriterionConfig(lambda_cls=lambda_cls, tau=tau, **kw), task=None)


def make_sample(B=3, seed=0, target=True, label=True):
    g = torch.Generator().manual_seed(seed)
    sample = {
        "id": torch.arange(10, 10 + B),
        "nsentences": B,
        "net_input": {"source": torch.randn(B, 1, FRAMES, 128, generator=g)},
        "num_skipped": 0,
    }
    if label:
        lab = torch.zeros(B, K)
        for b in range(B):
            lab[b, b % K] = 1.0
        lab[0, (1 + 0) % K] = 1.0  # clip 0 is multi-label
        sample["label"] = lab
    if target:
        sample["target"] = torch.randn(B, N, TARGET_DIM, generator=g)
    return sample


def run(crit, model, sample, seed=123):
    torch.manual_seed(seed)
    return crit(model, sample)


@pytest.mark.parametrize("lambda_cls,tau,kind", [(1e-4, 1.0, "mse"), (0.5, 0.5, "sum_sq"), (1e-4, 1.0, "l2"),
                                                 (1e-4, 1.0, "set_l2")])
def test_criterion_clap_total_loss(lambda_cls, tau, kind):
    model, crit, sample = make_model("clap"), make_criterion(lambda_cls, tau, clap_loss=kind), make_sample()
    loss, sample_size, log = run(crit, model, sample)
    assert sample_size == 1 and log["sample_size"] == 1
    assert {"loss", "loss_vis", "loss_mask", "loss_cls"} <= set(log) and "loss_rec" not in log
    assert log["loss"] == pytest.approx(log["loss_vis"] + log["loss_mask"] + lambda_cls * log["loss_cls"], rel=1e-5)
    assert loss.item() == pytest.approx(log["loss"], rel=1e-6)
    assert log["nsentences"] == 3 and log["ntokens"] == 3 and log["num_skipped"] == 0
    assert "ncorrect" not in log  # training mode

    # the logged terms are eqs. 1 and 2 on the model's output (same mask via the same seed)
    torch.manual_seed(123)
    out = model(**sample["net_input"])
    lv, lm = clap_target_loss(out["pred"], sample["target"], out["mask"], kind=kind)
    assert log["loss_vis"] == pytest.approx(lv.item(), rel=1e-5)
    assert log["loss_mask"] == pytest.approx(lm.item(), rel=1e-5)
    assert log["loss_cls"] == pytest.approx(soft_cross_entropy(out["logits"], sample["label"], tau).item(), rel=1e-5)

    loss.backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.classifier.mlp[0].weight.grad.abs().sum() > 0


def test_criterion_pixel_total_loss():
    model, crit, sample = make_model("pixel"), make_criterion(0.01, norm_pix_loss=True), make_sample(target=False)
    loss, _, log = run(crit, model, sample)
    assert {"loss", "loss_rec", "loss_cls"} <= set(log)
    assert "loss_vis" not in log and "loss_mask" not in log
    assert log["loss"] == pytest.approx(log["loss_rec"] + 0.01 * log["loss_cls"], rel=1e-5)
    torch.manual_seed(123)
    out = model(**sample["net_input"])
    expected = reconstruction_loss(out["pred"], out["patches"], out["mask"], norm_pix=True)
    assert log["loss_rec"] == pytest.approx(expected.item(), rel=1e-5)


def test_criterion_target_mask_and_normalised_targets():
    model, sample = make_model("clap"), make_sample()
    keep = torch.zeros(3, N, dtype=torch.bool)
    keep[:, :16] = True
    sample["target_mask"] = keep
    _, _, log = run(make_criterion(0.0, norm_clap_targets=True), model, sample)
    torch.manual_seed(123)
    out = model(**sample["net_input"])
    lv, lm = clap_target_loss(out["pred"], normalize_tokens(sample["target"]), out["mask"], keep)
    assert log["loss_vis"] == pytest.approx(lv.item(), rel=1e-5)
    assert log["loss_mask"] == pytest.approx(lm.item(), rel=1e-5)
    plain = clap_target_loss(out["pred"], sample["target"], out["mask"])
    assert log["loss_vis"] != pytest.approx(plain[0].item(), rel=1e-3)


def test_criterion_without_classification_term():
    # lambda_cls = 0: the branch may exist but contributes nothing; no label needed
    model, crit = make_model("clap", branch=True), make_criterion(0.0)
    loss, _, log = run(crit, model, make_sample(label=False))
    assert "loss_cls" not in log
    assert log["loss"] == pytest.approx(log["loss_vis"] + log["loss_mask"], rel=1e-6)
    # MAM without a branch
    loss, _, log = run(make_criterion(0.0), make_model("pixel", branch=False), make_sample(target=False))
    assert log["loss"] == pytest.approx(log["loss_rec"], rel=1e-6)


def test_criterion_config_errors():
    with pytest.raises(ValueError, match="classification_branch"):
        run(make_criterion(0.01), make_model("pixel", branch=False), make_sample(target=False))
    with pytest.raises(ValueError, match="target"):
        run(make_criterion(0.0), make_model("clap"), make_sample(target=False))
    with pytest.raises(ValueError, match="labels"):
        run(make_criterion(0.01), make_model("clap"), make_sample(label=False))


@pytest.mark.parametrize("target", ["pixel", "clap"])
def test_criterion_nan_source_raises(target):
    """Training: no check in the forward (no sync); the NaN surfaces in fairseq's gradient-norm
    check, whose NanDetector re-run then raises here with the sample ids. Validation checks each batch."""
    model, crit = make_model(target), make_criterion(1e-4)
    sample = make_sample(target=target == "clap")
    sample["net_input"]["source"][1] = float("nan")  # a whole clip of NaNs
    loss, _, log = run(crit, model, sample)
    assert not torch.isfinite(loss) and torch.is_tensor(log["loss"])
    with NanDetector(model), pytest.raises(FloatingPointError, match=r"non-finite loss.*\b11\b"):
        run(crit, model, sample)
    model.eval()
    crit.eval()
    with torch.no_grad(), pytest.raises(FloatingPointError, match=r"non-finite loss.*\b11\b"):
        run(crit, model, sample)


def test_criterion_nan_in_one_pixel_patch_raises():
    # pixel target: a single NaN value anywhere reaches the loss (visible -> encoder, masked -> target)
    model, crit = make_model("pixel", branch=False), make_criterion(0.0)
    sample = make_sample(target=False, label=False)
    sample["net_input"]["source"][0, 0, 37, 90] = float("nan")
    with NanDetector(model), pytest.raises(FloatingPointError):
        run(crit, model, sample)


@pytest.mark.parametrize("target,branch,lambda_cls,visible,kind", [
    ("pixel", False, 0.0, "decoder", "mse"), ("clap", False, 0.0, "encoder", "mse"),
    ("pixel", True, 0.01, "decoder", "mse"), ("clap", True, 1e-4, "encoder", "mse"),
    ("clap", True, 1e-4, "decoder", "sum_sq"), ("clap", True, 1e-4, "encoder", "l2"),
    ("clap", True, 1e-4, "encoder", "set_l2")])
def test_criterion_training_step_has_no_sync(target, branch, lambda_cls, visible, kind, request):
    """Each variant's criterion forward + backward calls nothing that waits for the device, with
    every eq. 1 distance and both sources of Y_v."""
    model, crit = make_model(target, branch=branch, visible=visible), make_criterion(lambda_cls, clap_loss=kind)
    sample = make_sample(target=target == "clap", label=branch)
    keep = torch.ones(3, N, dtype=torch.bool)
    keep[:, -8:] = False
    sample["target_mask"] = keep
    expected, _, _ = run(crit, model, sample)  # builds the cached window mask first (once per device)
    request.getfixturevalue("no_syncs")
    loss, _, log = run(crit, model, sample)
    loss.backward()
    assert all(torch.is_tensor(log[k]) for k in log if k.startswith("loss"))
    assert torch.equal(loss.detach(), expected.detach())


def _validate(crit, model, samples, seed=5):
    """Run the criterion in eval mode as fairseq's validation does (a temporary root
    aggregator, with the persistent "valid" one active inside it); return both."""
    name = "valid"
    previous = metrics._aggregators.pop(name, None)
    logs = []
    try:
        with torch.no_grad(), metrics.aggregate(new_root=True) as agg:
            with metrics.aggregate(name) as persistent:
                for sample in samples:
                    torch.manual_seed(seed)
                    logs.append(crit(model, sample)[2])
                    SupMamClapCriterion.reduce_metrics(logs[-1:])
        return agg.get_smoothed_values(), persistent, logs
    finally:
        metrics._aggregators.pop(name, None)
        if previous is not None:
            metrics._aggregators[name] = previous


def test_criterion_eval_logs_classification():
    """Validation: top-1 accuracy (the arg-max is one of the clip's labels) and mAP over the
    classes with a positive, from the softmax scores the branch is trained with (eq. 2),
    against scikit-learn; logs hold scalars."""
    model = make_model("clap")
    crit = make_criterion(1e-4, tau=0.5)
    sample = make_sample(B=4)
    # a few training steps so BatchNorm has running statistics, then evaluate
    for s in range(2):
        run(crit, model, make_sample(B=4, seed=s + 10))
    model.eval()
    crit.eval()
    with torch.no_grad():
        torch.manual_seed(5)
        logits = model(**sample["net_input"])["logits"]
    top1 = logits.argmax(-1)
    labels = torch.zeros(4, K)
    labels[0, top1[0]] = 1.0  # hit
    labels[1, (top1[1] + 1) % K] = 1.0  # miss
    labels[2, top1[2]] = 1.0  # hit (multi-label)
    labels[2, (top1[2] + 2) % K] = 1.0
    labels[3, (top1[3] + 3) % K] = 1.0  # miss
    sample["label"] = labels
    vals, persistent, (log,) = _validate(crit, model, [sample])
    assert vals["accuracy"] == pytest.approx(50.0)
    y, p = labels.numpy(), torch.softmax(logits / 0.5, dim=-1).numpy()
    present = y.sum(0) > 0
    assert vals["mAP"] == pytest.approx(100 * average_precision_score(y[:, present], p[:, present]), rel=1e-5)
    assert vals["mAP_classes_left_out"] == int((~present).sum())
    assert "mAP" not in persistent  # the array-holding meter stays out of checkpoints
    assert not any(isinstance(v, np.ndarray) for v in log.values())
    assert crit.logging_outputs_can_be_summed()


def test_validation_scores_are_the_training_softmax(monkeypatch):
    """The scores fed to the mAP / accuracy meter are softmax(p / tau), the distribution eq. 2
    trains, not a sigmoid: each row sums to one. Softmax and sigmoid rank a class's clips
    differently, so the mAP differs; here it is built to."""
    import mam_clap_plugin.criterions.supmam_clap as module

    seen = []
    monkeypatch.setattr(module, "log_clip_scores", lambda ids, scores, labels: seen.append(scores))
    model, crit = make_model("pixel"), make_criterion(0.01, tau=2.0)
    model.eval()
    crit.eval()
    sample = make_sample(B=4, target=False)
    with torch.no_grad():
        torch.manual_seed(5)
        crit(model, sample)
        torch.manual_seed(5)
        logits = model(**sample["net_input"])["logits"]
    (scores,) = seen
    torch.testing.assert_close(scores, torch.softmax(logits / 2.0, dim=-1))
    torch.testing.assert_close(scores.sum(-1), torch.ones(4))
    # why it matters: clip 0 has the larger logit for class 0, but a smaller share of its own softmax
    logits = torch.tensor([[3.0, 5.0], [2.0, 0.0]])
    assert torch.sigmoid(logits)[0, 0] > torch.sigmoid(logits)[1, 0]
    assert torch.softmax(logits, -1)[0, 0] < torch.softmax(logits, -1)[1, 0]


def _reduce(*batches):
    """Run reduce_metrics once per validation batch in a fresh aggregator; return smoothed values."""
    with metrics.aggregate(new_root=True) as agg:
        for logs in batches:
            SupMamClapCriterion.reduce_metrics(logs)
    return agg.get_smoothed_values()


def test_reduce_metrics_losses():
    log1 = dict(loss=2.0, loss_vis=1.5, loss_mask=0.5, sample_size=1, nsentences=3, ntokens=3, num_skipped=0)
    log2 = dict(loss=4.0, loss_vis=3.0, loss_mask=1.0, sample_size=1, nsentences=2, ntokens=2, num_skipped=1)
    # one call, or one call per validation batch: the sums accumulate
    for batches in ([[log1, log2]], [[log1], [log2]]):
        vals = _reduce(*batches)
        assert vals["loss"] == pytest.approx(3.0)
        assert vals["loss_vis"] == pytest.approx(2.25) and vals["loss_mask"] == pytest.approx(0.75)
        assert vals["skipped_files"] == 1
        assert not any(k.startswith("_") for k in vals)
        assert "loss_rec" not in vals and "loss_cls" not in vals
    assert _reduce([log1, log2])["nsentences"] == 5


def test_reduce_metrics_training_logs_have_no_accuracy():
    vals = _reduce([dict(loss=1.0, loss_rec=1.0, sample_size=1, nsentences=2, ntokens=2, num_skipped=0)])
    assert vals["loss"] == pytest.approx(1.0) and vals["loss_rec"] == pytest.approx(1.0)
    assert "accuracy" not in vals and "mAP" not in vals and "skipped_files" not in vals


def test_validation_metrics_over_several_batches():
    """Two validation batches: mAP and accuracy over all 8 clips, a class without positives
    left out; the same as computing them by hand on the concatenated scores."""
    model, crit = make_model("pixel"), make_criterion(0.01)
    run(crit, model, make_sample(B=4, target=False, seed=9))  # BatchNorm running stats
    model.eval()
    crit.eval()
    samples = [make_sample(B=4, seed=s, target=False) for s in range(2)]
    for i, sample in enumerate(samples):
        sample["id"] = torch.arange(4 * i, 4 * i + 4)
    vals, _, logs = _validate(crit, model, samples)
    scores, labels = [], []
    with torch.no_grad():
        for sample in samples:
            torch.manual_seed(5)
            scores.append(torch.softmax(model(**sample["net_input"])["logits"], dim=-1).numpy())
            labels.append(sample["label"].numpy())
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    present = labels.sum(0) > 0
    assert not present.all()  # a class without positives is left out of the mAP
    expected = 100 * average_precision_score(labels[:, present], scores[:, present], average="macro")
    assert vals["mAP"] == pytest.approx(expected, rel=1e-5)
    hits = labels[np.arange(8), scores.argmax(1)] > 0
    assert vals["accuracy"] == pytest.approx(100 * hits.mean())
    assert vals["loss"] == pytest.approx(np.mean([float(log["loss"]) for log in logs]), abs=1e-4)


@pytest.mark.slow
def test_nonfinite_loss_in_training_names_the_sample_ids(tone_set, tmp_path):
    """Through fairseq-hydra-train: a diverging run (lr 1e30) stops at fairseq's gradient-norm check,
    and its NanDetector re-run reaches the criterion, which names the batch's sample ids."""
    from mam_clap_plugin.hydra_runs import run_hydra_train

    from .conftest import CONFIG_DIR

    args = [f"task.data={tone_set}", f"checkpoint.save_dir={tmp_path / 'ckpt'}", "+size=tiny", "task.target_length=64",
            "common.cpu=true", "common.log_interval=1", "dataset.batch_size=6", "dataset.num_workers=0",
            "optimization.update_freq=[1]", "optimization.lr=[1e30]", "lr_scheduler.warmup_updates=0",
            "optimization.max_update=6"]
    run = run_hydra_train(CONFIG_DIR, "mam", args, tmp_path / "run", check=False)
    assert run.returncode != 0
    assert "gradients are Nan/Inf" in run.text
    assert re.search(r"FloatingPointError: non-finite loss .* on batch with sample ids \[(\d+, ){5}\d+\]", run.text), \
        run.text[-3000:]
