"""SupMAM-CLAP criterion (registered as ``supmam_clap``).

    L_total = L_target + lambda_cls * L_cls                                   (eq. 3)

L_target, for ``model.target=clap``, is eq. 1,

    L_target = 1/l_v ||Y_v, T_v||_2 + 1/l_m ||Y_m, T_m||_2,

with the per-token distance chosen by ``criterion.clap_loss`` (``d`` = Y - T of one token,
C teacher channels), then averaged over each set's tokens (l_v visible, l_m masked):

* ``mse`` (default): ``mean_c d_c^2``, the squared error averaged over the channels;
* ``sum_sq``: ``sum_c d_c^2``, the squared error summed over the channels (C times ``mse``);
* ``l2``: ``sqrt(sum_c d_c^2)``, the per-token Euclidean distance;
* ``set_l2``: eq. 1 read literally, per clip: the Euclidean norm of the whole set's error
  ``sqrt(sum over the set's tokens and channels of d^2)`` divided by the set's token count,
  then averaged over the clips.

Why ``mse`` is the default: with AdamW the loss's absolute scale does not matter, only the
terms' shares of the shared encoder's gradient do. The paper's weights (lambda_cls = 1e-4
for SupMAM-CLAP, 0.01 for SupMAM against AudioMAE's pixel MSE, itself averaged over the
256 pixels of a patch) only make sense if L_target is of order one: with ``mse`` the
classification term's gradient on the encoder is 0.37% of the target loss's at
initialisation (ViT-B, 768-d teacher, ``lambda_cls = 1e-4``), against 0.0005% with
``sum_sq``, which trains SupMAM-CLAP as MAM-CLAP. ``python -m benchmarks.loss_balance``
prints these ratios for every variant.

Tokens that are pure padding or lie beyond the teacher's clip (``sample["target_mask"]``)
are left out of both sets; with ``norm_clap_targets`` each teacher token is first
normalised to zero mean and unit variance over its channels. For ``model.target=pixel``
L_target is AudioMAE's reconstruction loss: the per-patch mean squared error on the
masked patches only, against per-patch normalised targets when ``norm_pix_loss`` is on.

L_cls = CE(p / tau, y) (eq. 2), with y the label set normalised to sum to one (soft
targets for multi-label clips).

Every term is logged. Validation also scores the classification branch with the softmax
it is trained with, softmax(p / tau): its top-1 accuracy (the arg-max is one of the clip's
labels) and its mAP (macro average precision over classes with a positive, from
scikit-learn), with the scores of every process gathered (:mod:`mam_clap_plugin.metrics`,
shared with fine-tuning), so both are exact in multi-process validation too.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.nan_detector import NanDetector

from ..metrics import log_clip_scores

#: Eq. 1's per-token distance (``criterion.clap_loss``); see the module docstring.
CLAP_LOSSES = ("mse", "sum_sq", "l2", "set_l2")
CLAP_LOSS_CHOICES = ChoiceEnum(list(CLAP_LOSSES))
#: Floor under the squared distances before a square root (its gradient at 0 is infinite).
SQRT_FLOOR = 1e-12


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
    clap_loss: CLAP_LOSS_CHOICES = field(  # type: ignore
        default="mse",
        metadata={"help": "target=clap, eq. 1's distance, averaged over l_v and l_m: mse (squared error averaged "
                          "over channels; default: keeps L_target of order one, so at the paper's lambda_cls=1e-4 the "
                          "branch's gradient on the encoder is ~0.4% of the target's at init), sum_sq (summed over "
                          "channels: ~0.0005%), l2 (per-token Euclidean distance), set_l2 (per clip, ||Y - T|| over "
                          "the whole set divided by its count). See benchmarks/loss_balance.py"},
    )


def normalize_tokens(target: torch.Tensor, unbiased: bool = False, eps: float = 1.0e-6) -> torch.Tensor:
    """(..., C) -> each token shifted and scaled to zero mean, unit variance over C
    (``unbiased``: sample variance, as AudioMAE's norm_pix_loss)."""
    target = target.float()
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=unbiased)
    return (target - mean) / (var + eps).sqrt()


def clap_target_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, keep: Optional[torch.Tensor] = None,
    kind: str = "mse",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: a per-token distance (``kind``, see :data:`CLAP_LOSSES`), averaged separately over
    visible and masked tokens.

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
    if kind not in CLAP_LOSSES:
        raise ValueError(f"criterion.clap_loss={kind!r} is not one of {CLAP_LOSSES}")
    diff = pred.float() - target.float()
    if keep is not None:
        # where, not a product: a left-out token's error (even NaN) enters neither the loss nor its gradient
        diff = torch.where(keep.unsqueeze(-1), diff, 0.0)
    sq = diff.pow(2).sum(dim=-1)  # (B, N) squared distance per token
    visible = ~mask if keep is None else ~mask & keep
    masked = mask if keep is None else mask & keep

    if kind == "set_l2":
        return set_l2_loss(sq, visible), set_l2_loss(sq, masked)
    if kind == "mse":
        err = sq / pred.shape[-1]
    elif kind == "l2":
        err = sq.clamp(min=SQRT_FLOOR).sqrt()
    else:
        err = sq
    return masked_mean(err, visible), masked_mean(err, masked)


def masked_mean(values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``members`` (bool, same shape), 0 for none: a fixed-shape
    ``where`` (no boolean indexing, no host sync), so a left-out value (even NaN) enters
    neither the mean nor its gradient."""
    return torch.where(members, values, 0.0).sum() / members.sum().clamp(min=1)


def set_l2_loss(sq: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """``set_l2``: per clip, sqrt(sum of the set's squared errors) / its count; then the mean over
    the clips whose set is not empty. sq, members: (B, N)."""
    counts = members.sum(dim=1)
    norms = torch.where(members, sq, 0.0).sum(dim=1).clamp(min=SQRT_FLOOR).sqrt()
    per_clip = torch.where(counts > 0, norms / counts.clamp(min=1), 0.0)
    return per_clip.sum() / (counts > 0).sum().clamp(min=1)


def reconstruction_loss(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """AudioMAE's loss: per-patch MSE, averaged over the masked patches.

    pred, patches: (B, N, P); mask: (B, N) bool, True = masked.
    """
    target = normalize_tokens(patches, unbiased=True) if norm_pix else patches.float()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return masked_mean(per_patch, mask)


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
        self.clap_loss = str(cfg.clap_loss)

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
                net_output["pred"], target, mask, sample.get("target_mask"), self.clap_loss
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
            # scored with the softmax the branch is trained with (eq. 2)
            log_clip_scores(sample["id"], torch.softmax(logits.float() / self.tau, dim=-1), sample["label"])
        return loss, 1, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        log_losses(logging_outputs, ("loss", "loss_vis", "loss_mask", "loss_rec", "loss_cls"))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Logs hold scalars only: validation scores reach the gathered mAP meter directly."""
        return True
