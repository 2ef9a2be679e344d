"""Fine-tuning criterion (registered as ``mam_clap_classification``).

* ``loss=bce``: binary cross-entropy with logits, averaged over clips and classes
  (multi-label data: AudioSet).
* ``loss=ce``: cross-entropy with label smoothing ``label_smoothing`` (0.1) against the
  label row normalised to sum 1 (single-label data: ESC-50, Speech Commands).

Targets are soft under mixup (``lam * y_a + (1 - lam) * y_b``); both losses take them
as they are. Validation logs ``mAP`` (macro AP over the classes with a positive in the
split), ``mAP_classes_left_out`` (classes without one) and top-1 ``accuracy``, computed
once per validation from the scores of every process (:mod:`mam_clap_plugin.metrics`),
so they are exact in multi-process runs; scores are sigmoid (bce) or softmax (ce)
probabilities.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..metrics import log_clip_scores
from .supmam_clap import check_finite, log_losses, under_nan_detector

LOSS_CHOICES = ChoiceEnum(["bce", "ce"])


@dataclass
class MamClapClassificationConfig(FairseqDataclass):
    loss: LOSS_CHOICES = field(  # type: ignore
        default="bce", metadata={"help": "bce: multi-label (AudioSet); ce: single-label (ESC-50, Speech Commands)"}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the ce loss (ignored by bce)"})


def classification_loss(logits: torch.Tensor, target: torch.Tensor, loss: str, label_smoothing: float = 0.0):
    """logits (B, K), target (B, K) multi-hot or soft -> scalar batch mean (float32)."""
    logits, target = logits.float(), target.float()
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    probs = target / target.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return F.cross_entropy(logits, probs, label_smoothing=label_smoothing)


@register_criterion("mam_clap_classification", dataclass=MamClapClassificationConfig)
class MamClapClassificationCriterion(FairseqCriterion):
    def __init__(self, cfg: MamClapClassificationConfig, task):
        super().__init__(task)
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ValueError(f"criterion.label_smoothing={cfg.label_smoothing} must be in [0, 1)")
        self.loss = cfg.loss
        self.label_smoothing = cfg.label_smoothing

    def forward(self, model, sample, reduce=True):
        """Returns (loss, sample_size=1, logging_output); the loss is a batch mean.

        As in pretraining, training runs without a host-device sync; a non-finite loss is
        named with the batch's sample ids when fairseq re-runs the update under its
        NanDetector, and in every validation batch."""
        logits = model(**sample["net_input"])["logits"]
        target = sample["label"]
        loss = classification_loss(logits, target, self.loss, self.label_smoothing)
        if not self.training or under_nan_detector(model):  # training: no sync per micro-batch (see supmam_clap)
            check_finite({"loss": loss}, sample)
        if not self.training:
            scores = torch.sigmoid(logits.float()) if self.loss == "bce" else torch.softmax(logits.float(), dim=-1)
            log_clip_scores(sample["id"], scores, target)
        log = {
            "loss": loss.detach(),
            "sample_size": 1,
            "nsentences": sample["nsentences"],
            "ntokens": sample["nsentences"],  # clips: fairseq's wpb/wps read as clips per batch / second
            "num_skipped": sample.get("num_skipped", 0),
        }
        return loss, 1, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        log_losses(logging_outputs, ("loss",))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Logs hold scalars only: the scores reach the mAP meter directly (see metrics)."""
        return True
