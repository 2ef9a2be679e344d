"""Contrastive loss of caption-trained CLAP teachers (registered as ``clap_infonce``).

Symmetric InfoNCE, as CLIP and CLAP: with L2-normalised clip embeddings a_i, caption embeddings
t_i and the model's learned logit scale s,

    logits = s * A T^T (N x N);  loss = (CE(logits, diag) + CE(logits^T, diag)) / 2

Across processes (``criterion.gather=true``, the default) every rank contrasts with every rank's
embeddings, as open_clip's ``gather_features`` with ``local_loss=False``: the embeddings of all
ranks are all-gathered (no gradient), each rank's own rows are put back with their gradient, and
each rank computes the whole N x N loss. Each rank's backward then yields exactly the gradient
that flows through its own clips and captions; it returns the loss times the world size W, so
that fairseq's averaging over ranks (DDP's mean, then times W / summed sample sizes, 1 per rank)
gives the gradient of the global-batch loss, and the logit scale, which every rank's loss uses
whole, enters with a gradient share of 1 / W. One step of W ranks thus equals one process with
the W batches together (tests/test_clap_teacher.py checks it with 2 gloo processes; the model's
BatchNorm uses global statistics too). Ranks may hold batches of different sizes: the sizes are
exchanged first (one small all_gather and a host sync per step).

Validation contrasts each rank's own batch (no gather) and logs ``loss``, and the retrieval recall
of the whole split, gathered from every rank (:func:`mam_clap_plugin.metrics.log_retrieval`):
``a2t_r1/5/10``, ``t2a_r1/5/10`` and their mean ``mean_recall``. Training logs ``loss`` and the
logit ``scale``.

A batch whose clips were all skipped (``task.skip_bad_files``) holds a placeholder (id -1): it
stays out of the contrast (with ``gather``, the other ranks contrast their own clips only) and of
the retrieval metrics; its own loss is 0 (the task multiplies it by 0 and logs no clip, as in
pretraining: :class:`mam_clap_plugin.tasks.base.FbankTask`).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from ..data.dataset import is_skipped_batch
from ..metrics import log_retrieval
from .supmam_clap import check_finite, log_losses, under_nan_detector


@dataclass
class ClapInfoNceConfig(FairseqDataclass):
    gather: bool = field(
        default=True,
        metadata={"help": "multi-process training: contrast with every rank's clips and captions (all_gather, as "
                          "open_clip); false: each rank with its own batch only"},
    )


def infonce(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of paired rows: audio, text (N, E) normalised, scale a scalar -> scalar (float32)."""
    logits = scale * audio.float() @ text.float().T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (B_r, ...) in rank order, this rank's keeping their gradient (the
    others carry none): open_clip's ``gather_features(local_loss=False, gather_with_grad=False)``.
    Batch sizes may differ between ranks (they are exchanged first)."""
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = torch.cat(sizes).tolist()
    padded = x.detach().new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[rank] = x
    return torch.cat(parts)


@register_criterion("clap_infonce", dataclass=ClapInfoNceConfig)
class ClapInfoNceCriterion(FairseqCriterion):
    def __init__(self, cfg: ClapInfoNceConfig, task):
        super().__init__(task)
        self.gather = cfg.gather

    def forward(self, model, sample, reduce=True):
        """Returns (loss x W, sample_size=1, logging_output); see the module docstring."""
        out = model(**sample["net_input"])
        audio, text, scale = out["audio"], out["text"], out["scale"]
        placeholder = is_skipped_batch(sample)
        if placeholder:  # its one row (id -1, a zero clip and an empty caption) is no pair to contrast
            audio, text = audio[:0], text[:0]
        world = world_size() if self.training and self.gather else 1
        if world > 1:
            width = audio.shape[1]
            both = gather_features(torch.cat([audio, text], dim=1))
            audio, text = both[:, :width], both[:, width:]
            scale = scale / world + (scale - scale / world).detach()  # the value of scale, 1 / W of its gradient
        loss = infonce(audio, text, scale) if audio.shape[0] else scale * 0
        if placeholder:  # 0, with every parameter in the graph (the task multiplies it by 0 in training)
            loss = loss + 0 * (out["audio"].sum() + out["text"].sum())
        if not self.training or under_nan_detector(model):  # training: no sync per micro-batch
            check_finite({"loss": loss}, sample)
        if not self.training:
            log_retrieval(sample["id"], out["audio"], out["text"], sample["net_input"]["captions"])
        log = {
            "loss": loss.detach(),  # the same global loss on every rank: summed over the ranks / their sample sizes
            "scale": out["scale"].detach(),
            "sample_size": 1,
            "nsentences": sample["nsentences"],
            "ntokens": sample["nsentences"],  # clips: fairseq's wpb/wps read as clips per batch / second
            "num_skipped": sample.get("num_skipped", 0),
        }
        return loss * world, 1, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        log_losses(logging_outputs, ("loss", "scale"))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Logs hold scalars only: the embeddings reach the retrieval meter directly."""
        return True
