"""Scoring audio with a fine-tuned ``mam_clap_classifier`` checkpoint.

Used by ``examples/finetuning/evaluate.py``, ``examples/predict.py`` and the demo.

A clip of any length is cut into windows of the checkpoint's ``task.target_length``
frames (the last one zero-padded, as in training); the clip's scores are the mean of
its windows' probabilities (sigmoid for a ``bce`` model, softmax for ``ce``).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Iterable, List, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint
from .data.audio import FRAME_SHIFT_MS, SAMPLE_RATE, WINDOW_SAMPLES, load_audio, normalize_fbank, wav_to_fbank
from .data.manifest import read_class_list, read_labels, read_manifest
from .metrics import classification_metrics, per_class_ap


class Classifier(NamedTuple):
    """A fine-tuned model (eval mode) with what scoring needs from its checkpoint."""

    model: torch.nn.Module
    task: object  # the rebuilt MamClapFinetuningTask (norm stats, target_length, class names)
    loss: str  # "bce" or "ce"

    @property
    def class_names(self) -> List[str]:
        return self.task.class_names

    @property
    def target_length(self) -> int:
        return self.task.cfg.target_length


def load_classifier(path: str) -> Classifier:
    """Rebuild a fine-tuned checkpoint (weights-only load; no data or pretraining file needed)."""
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    from . import criterions, models, tasks  # noqa: F401  (registers the components with fairseq)

    state = load_checkpoint(path)
    name = (state.get("cfg") or {}).get("model", {}).get("_name")
    if name != "mam_clap_classifier":
        raise CheckpointError(f"{path}: model is {name!r}, expected a fine-tuned 'mam_clap_classifier' checkpoint")
    state["cfg"] = OmegaConf.create(state["cfg"])
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    return Classifier(models[0].eval(), task, cfg.criterion.get("loss", "bce"))


def num_frames(num_samples: int) -> int:
    """Kaldi fbank frames of a 16 kHz waveform (at least one)."""
    return 1 + max(0, num_samples - WINDOW_SAMPLES) // (SAMPLE_RATE * FRAME_SHIFT_MS // 1000)


def windows(wav: torch.Tensor, clf: Classifier) -> torch.Tensor:
    """(S,) 16 kHz waveform -> (W, 1, target_length, 128) normalised fbank windows."""
    length = clf.target_length
    count = max(1, math.ceil(num_frames(wav.shape[0]) / length))
    fbank = normalize_fbank(wav_to_fbank(wav, count * length), clf.task.norm_mean, clf.task.norm_std)
    return fbank.reshape(count, length, -1).unsqueeze(1)


@torch.no_grad()
def score_waveforms(clf: Classifier, wavs: Iterable[torch.Tensor], batch_size: int = 32) -> np.ndarray:
    """(N, K) clip scores: window probabilities averaged per clip."""
    scores = []
    for wav in wavs:
        parts = [clf.model(chunk)["logits"].float() for chunk in windows(wav, clf).split(batch_size)]
        logits = torch.cat(parts)
        probs = torch.sigmoid(logits) if clf.loss == "bce" else torch.softmax(logits, dim=-1)
        scores.append(probs.mean(dim=0).numpy())
    return np.stack(scores)


def evaluate_split(clf: Classifier, data_dir: str, split: str, labels_ext: str = "lbl",
                   class_list: str = "classes.txt", progress: bool = True) -> Dict:
    """mAP, accuracy, clip count and per-class AP of ``data_dir/{split}.tsv`` (whole clips, windowed)."""
    names_path = os.path.join(data_dir, class_list)
    clf.task.check_class_list(read_class_list(names_path), names_path)
    manifest = read_manifest(os.path.join(data_dir, f"{split}.tsv"))
    labels = read_labels(os.path.join(data_dir, f"{split}.{labels_ext}"), len(manifest), len(clf.class_names))
    target = np.zeros((len(manifest), len(clf.class_names)), dtype=np.float32)
    for i, ids in enumerate(labels):
        target[i, ids] = 1.0
    wavs = (load_audio(manifest.full_path(i), where=manifest.where(i)) for i in range(len(manifest)))
    scores = score_waveforms(clf, tqdm(wavs, total=len(manifest), desc=f"{split}", disable=not progress))
    res = classification_metrics(scores, target)
    per_class = per_class_ap(res, clf.class_names)
    out = {"split": split, "data": data_dir, "num_clips": res.num_clips, "mAP": res.mAP, "accuracy": res.accuracy,
           "classes_left_out": res.left_out, "per_class_ap": per_class}
    if clf.loss == "bce":  # multi-label: the classes to look at first
        ranked = sorted(per_class, key=per_class.get)
        out["worst_classes"] = [[n, per_class[n]] for n in ranked[:5]]
        out["best_classes"] = [[n, per_class[n]] for n in ranked[::-1][:5]]
    return out
