"""Clip-classification metrics that stay exact in multi-process validation.

* :func:`classification_metrics`: macro mAP over the classes that have a positive (and
  how many classes were left out for having none), per-class AP (scikit-learn's
  ``average_precision_score``) and top-1 accuracy (the arg-max is one of the clip's
  labels), all in percent.
* :func:`gather_clips`: the (ids, scores, labels) rows of every process, once each (by
  clip id: fairseq's dummy batches repeat clips), through ``torch.distributed.all_gather_object``
  on the default process group. It has no size limit (fairseq's ``all_gather_list`` has
  16 KiB) and works with gloo and NCCL.
* :class:`ClassificationMeter` and :func:`log_clip_scores`: a fairseq meter fed with
  each validation batch's scores; its value (mAP, with ``accuracy`` and
  ``mAP_classes_left_out`` derived from the same gathered rows) is computed once, when
  fairseq reads the validation aggregator, which every process does at the same point.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import numpy as np
import torch
from fairseq import metrics
from fairseq.logging.meters import Meter, MetersDict


class ClassificationResult(NamedTuple):
    """mAP and accuracy in percent (nan without clips); ``per_class_ap`` (K,) in percent,
    nan for a class with no positive clip (those are the ``left_out`` classes)."""

    mAP: float
    accuracy: float
    per_class_ap: np.ndarray
    left_out: int
    num_clips: int


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> ClassificationResult:
    """scores: (N, K) any monotone score (logits or probabilities); labels: (N, K) with
    positives > 0 (multi-hot). Returns a :class:`ClassificationResult`."""
    from sklearn.metrics import average_precision_score

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (clips, classes)")
    num_clips, num_classes = scores.shape
    per_class = np.full(num_classes, np.nan)
    present = labels.any(axis=0)
    if num_clips == 0:
        return ClassificationResult(float("nan"), float("nan"), per_class, num_classes, 0)
    if present.any():
        per_class[present] = 100.0 * average_precision_score(labels[:, present], scores[:, present], average=None)
    mean_ap = float(per_class[present].mean()) if present.any() else float("nan")
    top1 = scores.argmax(axis=1)
    accuracy = 100.0 * float(labels[np.arange(num_clips), top1].mean())
    return ClassificationResult(mean_ap, accuracy, per_class, int((~present).sum()), num_clips)


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def gather_clips(ids: np.ndarray, scores: np.ndarray, labels: np.ndarray):
    """Rows of all processes (a no-op in one process), each clip once, sorted by id.

    ids: (N,) ints; scores, labels: (N, K). Every process must call it (a collective).
    """
    if _world_size() > 1:
        parts: List[Optional[tuple]] = [None] * _world_size()
        torch.distributed.all_gather_object(parts, (ids, scores, labels))
        ids = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts])
    ids, first = np.unique(ids, return_index=True)
    return ids, scores[first], labels[first]


class ClassificationMeter(Meter):
    """Collects (clip id, scores, labels) over one validation pass.

    ``result`` gathers the rows of every process once (see :func:`gather_clips`) and
    caches the :class:`ClassificationResult` until the next update; ``smoothed_value``
    is its mAP. Lives only in a validation pass's temporary aggregator (see
    :func:`log_clip_scores`), so it is never saved in a checkpoint.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.ids: List[np.ndarray] = []
        self.scores: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []
        self._result: Optional[ClassificationResult] = None

    def update(self, ids, scores, labels):
        self.ids.append(np.asarray(ids, dtype=np.int64))
        self.scores.append(np.asarray(scores, dtype=np.float32))
        self.labels.append(np.asarray(labels, dtype=np.float32))
        self._result = None

    @property
    def result(self) -> ClassificationResult:
        if self._result is None:
            rows = (np.concatenate(self.ids), np.concatenate(self.scores), np.concatenate(self.labels))
            self._result = classification_metrics(*gather_clips(*rows)[1:])
        return self._result

    @property
    def smoothed_value(self) -> float:
        return self.result.mAP


def log_clip_scores(ids: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, key: str = "mAP") -> None:
    """Feed a validation batch to the ``key`` meter (and its derived ``accuracy`` and
    ``{key}_classes_left_out``) of each temporary aggregator that is active.

    Rows with a negative id (the placeholder of a batch whose clips were all skipped, see
    :meth:`~mam_clap_plugin.data.dataset.MamClapDataset.placeholder_item`) are left out.

    Call it from the criterion's forward, not from ``reduce_metrics``: fairseq's validation
    loop runs under a temporary root aggregator that it reads once at the end, while
    ``reduce_metrics`` also runs under a per-batch aggregator that is read (and would
    gather) after every batch. Named aggregators ("valid", "default") are persistent and
    saved in checkpoints (an array-holding meter there would grow forever and could not be
    restored): they are left out.
    """
    named = {id(agg) for agg in metrics._aggregators.values()}
    rows = (ids.cpu().numpy(), scores.detach().float().cpu().numpy(), labels.detach().float().cpu().numpy())
    real = rows[0] >= 0  # id -1: the placeholder of a batch whose clips were all skipped
    if not real.all():
        rows = tuple(r[real] for r in rows)
        if not len(rows[0]):
            return
    for agg in metrics.get_active_aggregators():
        if id(agg) in named:
            continue
        if key not in agg:
            agg.add_meter(key, ClassificationMeter(), priority=50)
            agg.add_meter("accuracy", MetersDict._DerivedMeter(lambda m: m[key].result.accuracy), priority=51)
            agg.add_meter(f"{key}_classes_left_out", MetersDict._DerivedMeter(lambda m: m[key].result.left_out),
                          priority=52)
        agg[key].update(*rows)


def per_class_ap(result: ClassificationResult, class_names: List[str]) -> Dict[str, float]:
    """Per-class AP (percent) by class name; classes without a positive are omitted."""
    return {name: float(ap) for name, ap in zip(class_names, result.per_class_ap) if np.isfinite(ap)}
