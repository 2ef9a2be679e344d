"""Class-balanced clip weights for AudioSet-2M fine-tuning (AudioMAE's weighted sampling).

A class weighs ``1000 / (count + 0.01)`` (count: its clips in the label file) and a clip
the sum of its labels' weights. :func:`draw_epoch` draws an epoch's clips with
replacement in proportion to the weights from numpy's global RNG, which fairseq seeds
with ``common.seed + epoch`` around ``ordered_indices``: every process draws the same
list (fairseq then deals its batches out to the ranks, disjointly) and a resumed run
redraws the same epoch.

``{split}.weights`` holds one float per manifest line (written by
``examples/finetuning/sample_weights.py``).
"""
from __future__ import annotations

import math

import numpy as np

from .manifest import ManifestError, _read_lines


def clip_weights(labels: list[list[int]], num_classes: int) -> np.ndarray:
    """(num_clips,) float64: per clip, the sum over its labels of ``1000 / (class count + 0.01)``."""
    counts = np.zeros(num_classes)
    for ids in labels:
        counts[ids] += 1
    class_weight = 1000.0 / (counts + 0.01)
    return np.array([class_weight[ids].sum() for ids in labels])


def write_weights(path: str, weights: np.ndarray) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{w:.9g}\n" for w in weights)


def read_weights(path: str, num_entries: int) -> np.ndarray:
    """Read ``{split}.weights`` (one finite weight >= 0 per manifest entry, not all 0)."""
    lines = _read_lines(path, "sample weight")
    if len(lines) != num_entries:
        raise ManifestError(f"{path}: {len(lines)} weights but the manifest has {num_entries} entries")
    weights = np.empty(num_entries)
    for i, line in enumerate(lines):
        try:
            weights[i] = float(line)
        except ValueError:
            raise ManifestError(f"{path}:{i + 1}: weight {line!r} is not a number") from None
        if not math.isfinite(weights[i]) or weights[i] < 0:
            raise ManifestError(f"{path}:{i + 1}: weight {line!r} must be finite and >= 0")
    if weights.sum() <= 0:
        raise ManifestError(f"{path}: all weights are 0")
    return weights


def draw_epoch(weights: np.ndarray, size: int) -> np.ndarray:
    """(size,) int64 clip indices drawn with replacement, P(i) = w_i / sum(w), from numpy's global RNG."""
    return np.random.choice(len(weights), size=size, replace=True, p=weights / weights.sum()).astype(np.int64)
