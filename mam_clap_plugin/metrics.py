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


# ---------------------------------------------------------------------------------------------
# Retrieval (caption-trained CLAP teachers)

#: The recall@k of :func:`retrieval_metrics`.
RECALL_AT = (1, 5, 10)


class RetrievalResult(NamedTuple):
    """Recall@k in percent for both directions (``a2t_r1`` ... ``t2a_r10``), their mean
    (``mean_recall``), the same for a random ranking (``chance``), and the counts."""

    recall: Dict[str, float]
    chance: Dict[str, float]
    num_clips: int
    num_captions: int

    @property
    def mean_recall(self) -> float:
        return float(np.mean(list(self.recall.values())))


def retrieval_metrics(audio: np.ndarray, text: np.ndarray, captions: List[str], ks=RECALL_AT) -> RetrievalResult:
    """Audio->text and text->audio recall@k of clip embeddings ``audio`` (N, E) against the
    embeddings ``text`` (N, E) of their captions (``captions[i]`` is clip i's caption).

    Identical caption strings are one caption (a data set whose captions come from class names and
    templates repeats them): the caption gallery is the distinct captions. Audio->text: clip i
    queries the gallery; a hit at k when its caption ranks within the top k. Text->audio: each
    clip's caption queries the clips; a hit at k when a clip with that caption ranks within the top
    k. Averages over the N clips; ties rank in the query's favour. ``chance`` is the expected
    recall of a random ranking: min(k, U) / U, and 1 - C(N - m, k) / C(N, k) for a caption that m
    of the N clips share (k capped at N).
    """
    from math import comb

    audio, text = np.asarray(audio, dtype=np.float64), np.asarray(text, dtype=np.float64)
    n = len(captions)
    if audio.shape[0] != n or text.shape[0] != n or n == 0:
        raise ValueError(f"retrieval needs as many audio ({audio.shape[0]}) and text ({text.shape[0]}) embeddings "
                         f"as captions ({n}), at least one")
    first_of = {}  # caption -> the index of its first clip
    for i, c in enumerate(captions):
        first_of.setdefault(c, i)
    distinct = {c: k for k, c in enumerate(first_of)}
    group = np.array([distinct[c] for c in captions])
    first = np.array(list(first_of.values()))
    sims = audio @ text[first].T  # (N, U)
    own = sims[np.arange(n), group]
    a2t_rank = (sims > own[:, None]).sum(axis=1)  # distinct captions scoring above the clip's own
    best_own = np.full(len(distinct), -np.inf)  # per caption: its best-scoring clip among those it captions
    np.maximum.at(best_own, group, own)
    t2a_rank = (sims > best_own[None, :]).sum(axis=0)[group]  # clips above the query caption's best clip
    u, sizes = len(distinct), np.bincount(group)
    recall, chance = {}, {}
    for k in ks:
        recall[f"a2t_r{k}"] = 100.0 * float((a2t_rank < k).mean())
        recall[f"t2a_r{k}"] = 100.0 * float((t2a_rank < k).mean())
        chance[f"a2t_r{k}"] = 100.0 * min(k, u) / u
        top = min(k, n)
        chance[f"t2a_r{k}"] = 100.0 * float(np.mean([1.0 - comb(n - sizes[g], top) / comb(n, top) for g in group]))
    order = [f"{d}_r{k}" for d in ("a2t", "t2a") for k in ks]
    return RetrievalResult({k: recall[k] for k in order}, {k: chance[k] for k in order}, n, u)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` through ``all_gather_object`` (``[obj]`` in one process)."""
    if _world_size() == 1:
        return [obj]
    parts: List[Optional[object]] = [None] * _world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


class RetrievalMeter(Meter):
    """Collects (clip id, audio embedding, text embedding, caption) over one validation pass; its
    value is the mean recall of :func:`retrieval_metrics` over every process's clips (each clip
    once, by id, as :func:`gather_clips`). Lives in a validation pass's temporary aggregator only."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.rows: List[tuple] = []
        self._result: Optional[RetrievalResult] = None

    def update(self, ids, audio, text, captions):
        self.rows.append((np.asarray(ids, dtype=np.int64), np.asarray(audio, dtype=np.float32),
                          np.asarray(text, dtype=np.float32), list(captions)))
        self._result = None

    @property
    def result(self) -> RetrievalResult:
        if self._result is None:
            mine = (np.concatenate([r[0] for r in self.rows]), np.concatenate([r[1] for r in self.rows]),
                    np.concatenate([r[2] for r in self.rows]), [c for r in self.rows for c in r[3]])
            parts = gather_objects(mine)
            ids = np.concatenate([p[0] for p in parts])
            audio, text = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
            captions = [c for p in parts for c in p[3]]
            ids, keep = np.unique(ids, return_index=True)
            self._result = retrieval_metrics(audio[keep], text[keep], [captions[i] for i in keep])
        return self._result

    @property
    def smoothed_value(self) -> float:
        return self.result.mean_recall


def log_retrieval(ids: torch.Tensor, audio: torch.Tensor, text: torch.Tensor, captions: List[str]) -> None:
    """Feed a validation batch to the ``mean_recall`` meter (and the derived ``a2t_r1`` ...
    ``t2a_r10``) of each temporary aggregator that is active; as :func:`log_clip_scores`, rows with a
    negative id (a placeholder) left out."""
    named = {id(agg) for agg in metrics._aggregators.values()}
    rows = (ids.cpu().numpy(), audio.detach().float().cpu().numpy(), text.detach().float().cpu().numpy(), captions)
    real = rows[0] >= 0  # id -1: the placeholder of a batch whose clips were all skipped
    if not real.all():
        rows = (*(r[real] for r in rows[:3]), [c for c, keep in zip(captions, real) if keep])
        if not len(rows[0]):
            return
    for agg in metrics.get_active_aggregators():
        if id(agg) in named:
            continue
        if "mean_recall" not in agg:
            agg.add_meter("mean_recall", RetrievalMeter(), priority=50)
            for i, key in enumerate(f"{d}_r{k}" for d in ("a2t", "t2a") for k in RECALL_AT):
                agg.add_meter(key, MetersDict._DerivedMeter(lambda m, key=key: m["mean_recall"].result.recall[key]),
                              priority=51 + i)
        agg["mean_recall"].update(*rows)
