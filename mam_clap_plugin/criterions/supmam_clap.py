"""SupMAM-CLAP criterion (registered as ``supmam_clap``).

    L_total = L_target + lambda_cls * L_cls                                   (eq. 3)

L_target is, for ``model.target=clap`` (eq. 1),

    mean over visible tokens of ||Y_v - T_v||^2 + mean over masked tokens of ||Y_m - T_m||^2

(squared L2 norm per token, averaged over each set's token count; tokens that are pure
padding or lie beyond the teacher's clip, ``sample["target_mask"]``, are left out of both
sets; with ``norm_clap_targets`` each teacher token is first normalised to zero mean and
unit variance over its channels), and for
``model.target=pixel`` AudioMAE's reconstruction loss: the per-patch mean squared
error on the masked patches only, against per-patch normalised targets when
``norm_pix_loss`` is on.

L_cls = CE(p / tau, y) (eq. 2), with y the label set normalised to sum to one (soft
targets for multi-label clips).

Every term is logged. Validation also logs the classification branch's top-1
accuracy (the arg-max is one of the clip's labels) and its mAP (macro average
precision over classes with a positive, from scikit-learn), with the scores of every
process gathered (:mod:`mam_clap_plugin.metrics`, shared with fine-tuning), so both are
exact in multi-process validation too.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.nan_detector import NanDetector

from ..metrics import log_clip_scores


@dataclass
class SupMamClapCriterionConfig(FairseqDataclass):
    lambda_cls: float = field(
        default=0.0, metadata={"help": "weight of the classification loss (SupMAM 0.01, SupMAM-CLAP 1e-4, MAM 0)"}
    )
    tau: float = field(default=1.0, metadata={"help": "temperature tau of CE(p / tau, y)"})
    norm_pix_loss: bool = field(
        default=True, metadata={"help": "target=pixel: normalise each target patch to zero mean, unit variance"}
    )
    norm_clap_targets: bool = field(
        default=False,
        metadata={"help": "target=clap: normalise each teacher token to zero mean, unit variance over its channels"},
    )


def normalize_tokens(target: torch.Tensor, unbiased: bool = False, eps: float = 1.0e-6) -> torch.Tensor:
    """(..., C) -> each token shifted and scaled to zero mean, unit variance over C
    (``unbiased``: sample variance, as AudioMAE's norm_pix_loss)."""
    target = target.float()
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=unbiased)
    return (target - mean) / (var + eps).sqrt()


def clap_target_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, keep: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: per-token squared L2 distance, averaged separately over visible and masked tokens.

    pred, target: (B, N, C); mask: (B, N) bool, True = masked; keep: optional (B, N) bool,
    False for tokens left out of both sets (padding, beyond the teacher's clip).
    Returns (loss_visible, loss_masked); a set with no tokens contributes 0. Masked sums
    over fixed shapes (no boolean indexing): no host-device sync.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(pred.shape)} and teacher target {tuple(target.shape)} differ in shape "
            "(the target store or teacher does not match model.target_dim / task.target_length)"
        )
    err = (pred.float() - target.float()).pow(2).sum(dim=-1)  # (B, N)
    visible = ~mask if keep is None else ~mask & keep
    masked = mask if keep is None else mask & keep

    def set_mean(members: torch.Tensor) -> torch.Tensor:
        # where, not a product: a left-out token's error (even NaN) never enters the sum
        return torch.where(members, err, 0.0).sum() / members.sum().clamp(min=1)

    return set_mean(visible), set_mean(masked)


def reconstruction_loss(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """AudioMAE's loss: per-patch MSE, averaged over the masked patches.

    pred, patches: (B, N, P); mask: (B, N) bool, True = masked.
    """
    target = normalize_tokens(patches, unbiased=True) if norm_pix else patches.float()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp(min=1.0)


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 2: CE(logits / tau, y); labels (B, K) multi-hot, normalised per row to sum 1."""
    weights = labels.float() / labels.float().sum(dim=-1, keepdim=True).clamp(min=1.0)
    return -(weights * F.log_softmax(logits.float() / tau, dim=-1)).sum(dim=-1).mean()


def under_nan_detector(model) -> bool:
    """True while fairseq re-runs an update's forward passes under its NanDetector, which it
    does after its own check found a non-finite gradient norm (``trainer.train_step``)."""
    model = getattr(model, "module", model)  # DDP wrappers
    return any(isinstance(getattr(hook, "__self__", None), NanDetector) for hook in model._forward_hooks.values())


def check_finite(terms: Dict[str, torch.Tensor], sample) -> None:
    """Raise FloatingPointError naming the batch's sample ids if the loss is not finite (syncs)."""
    values = dict(zip(terms, torch.stack([t.detach().float() for t in terms.values()]).tolist()))
    if not np.isfinite(values["loss"]):
        raise FloatingPointError(f"non-finite loss ({values}) on batch with sample ids {sample['id'].tolist()}")


def log_losses(logging_outputs, keys) -> None:
    """fairseq's reduce step: each loss term in ``keys`` averaged over ``sample_size``, the
    clip count, and ``skipped_files`` when bad files were skipped (shared with fine-tuning)."""

    def total(key):
        return sum(log.get(key, 0) for log in logging_outputs)

    sample_size = total("sample_size")
    for key in keys:
        if any(key in log for log in logging_outputs):
            metrics.log_scalar(key, total(key) / max(sample_size, 1), sample_size, round=4)
    metrics.log_scalar("nsentences", total("nsentences"), round=0)
    skipped = total("num_skipped")
    if skipped:
        metrics.log_scalar_sum("skipped_files", skipped)


@register_criterion("supmam_clap", dataclass=SupMamClapCriterionConfig)
class SupMamClapCriterion(FairseqCriterion):
    def __init__(self, cfg: SupMamClapCriterionConfig, task):
        super().__init__(task)
        self.lambda_cls = cfg.lambda_cls
        self.tau = cfg.tau
        self.norm_pix_loss = cfg.norm_pix_loss
        self.norm_clap_targets = cfg.norm_clap_targets

    def forward(self, model, sample, reduce=True):
        """Returns (loss, sample_size=1, logging_output); the loss is a batch mean.

        Training runs without a host-device sync: the logged terms stay device tensors
        until fairseq reduces them once per update. A non-finite loss makes fairseq's own
        gradient-norm check fail; fairseq then re-runs the update's batches under its
        NanDetector, and this criterion raises there, naming the batch's sample ids (in
        validation it checks every batch).
        """
        net_output = model(**sample["net_input"])
        mask = net_output["mask"]
        terms: Dict[str, torch.Tensor] = {}
        if model.cfg.target == "clap":
            if "target" not in sample:
                raise ValueError(
                    "model.target=clap needs teacher targets: set task.target_store (offline) "
                    "or task.teacher_checkpoint (online)"
                )
            target = sample["target"]
            if self.norm_clap_targets:
                target = normalize_tokens(target)
            terms["loss_vis"], terms["loss_mask"] = clap_target_loss(
                net_output["pred"], target, mask, sample.get("target_mask")
            )
            loss = terms["loss_vis"] + terms["loss_mask"]
        else:
            loss = terms["loss_rec"] = reconstruction_loss(
                net_output["pred"], net_output["patches"], mask, self.norm_pix_loss
            )

        logits = net_output["logits"]
        if self.lambda_cls > 0:
            if logits is None:
                raise ValueError("criterion.lambda_cls > 0 needs model.classification_branch=true")
            if "label" not in sample:
                raise ValueError("criterion.lambda_cls > 0 needs class labels: set task.labels")
            terms["loss_cls"] = soft_cross_entropy(logits, sample["label"], self.tau)
            loss = loss + self.lambda_cls * terms["loss_cls"]
        terms["loss"] = loss

        if not self.training or under_nan_detector(model):
            check_finite(terms, sample)
        log: Dict[str, object] = {k: t.detach() for k, t in terms.items()}
        log.update(
            sample_size=1,
            nsentences=sample["nsentences"],
            ntokens=sample["nsentences"],  # clips: fairseq's wpb/wps then read as clips per batch / second
            num_skipped=sample.get("num_skipped", 0),
        )
        if logits is not None and "label" in sample and not self.training:
            log_clip_scores(sample["id"], torch.sigmoid(logits.float()), sample["label"])
        return loss, 1, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        log_losses(logging_outputs, ("loss", "loss_vis", "loss_mask", "loss_rec", "loss_cls"))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Logs hold scalars only: validation scores reach the gathered mAP meter directly."""
        return True
