"""Scoring audio with a fine-tuned ``mam_clap_classifier`` checkpoint.

Used by ``examples/finetuning/evaluate.py``, ``examples/predict.py`` and the demo.

:func:`load_classifier` reads a fairseq fine-tuning checkpoint (its class names are in the
task state) or an encoder export that keeps a classifier head (a converted fine-tuned
AudioMAE file: ``fc_norm.*`` / ``head.*`` under ``config["head"]``). An export holds no
class names, so a class list file is given with it (AudioSet's 527 names, one per line, as
``examples/prepare/labels.py audioset`` writes ``classes.txt``); its length must be the
head's output count. AudioMAE's AudioSet heads are multi-label: scored with a sigmoid.

A clip of any length is cut into windows of the checkpoint's ``task.target_length``
frames (the last one zero-padded, as in training); the clip's scores are the mean of
its windows' probabilities (sigmoid for a ``bce`` model, softmax for ``ce``).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Iterable, List, NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, head_keys, is_exported, load_checkpoint, load_encoder_with_stats
from .data.audio import load_audio, normalize_fbank, num_fbank_frames, wav_to_fbank
from .data.manifest import multi_hot, read_class_list, read_labels, read_manifest
from .metrics import classification_metrics, per_class_ap
from .modules.encoder import MODEL_CONFIG_FIELDS


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


def load_classifier(path: str, class_list: Optional[str] = None) -> Classifier:
    """Rebuild a fine-tuned checkpoint or an encoder export with a head (weights-only load;
    no data or pretraining file needed). ``class_list``: a class list file, required for an
    export (which holds no names) and checked against a fairseq checkpoint's names."""
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    from . import criterions, models, tasks  # noqa: F401  (registers the components with fairseq)

    state = load_checkpoint(path)
    if is_exported(state):
        return _classifier_from_export(state, path, class_list)
    name = (state.get("cfg") or {}).get("model", {}).get("_name")
    if name != "mam_clap_classifier":
        raise CheckpointError(f"{path}: model is {name!r}, expected a fine-tuned 'mam_clap_classifier' checkpoint "
                              "or an encoder export that keeps a classifier head")
    state["cfg"] = OmegaConf.create(state["cfg"])
    ensemble, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    if class_list is not None:
        task.check_class_list(read_class_list(class_list), class_list)
    return Classifier(ensemble[0].eval(), task, cfg.criterion.get("loss", "bce"))


def _classifier_from_export(state: Dict, path: str, class_list: Optional[str]) -> Classifier:
    """A ``mam_clap_classifier`` (mean pooling, fc_norm, head) from an export's encoder and
    kept head, loaded strictly, with a fine-tuning task holding the export's norm stats,
    target length and the names of ``class_list``."""
    from .models.mam_clap_classifier import MamClapClassifier, MamClapClassifierConfig
    from .tasks.mam_clap_finetuning import MamClapFinetuningConfig, MamClapFinetuningTask

    head = state["config"].get("head")
    if not head:
        raise CheckpointError(
            f"{path}: an encoder export without a classifier head (config 'head' is null), so it cannot score "
            "classes. Fine-tune one: fairseq-hydra-train --config-dir examples/finetuning/config --config-name "
            f"as20k task.data=DATA model.model_path={path} (see docs/finetuning.md)")
    if head.get("pooling", "mean") != "mean":
        raise CheckpointError(f"{path}: head pooling {head.get('pooling')!r}; only 'mean' (AudioMAE's) is supported")
    if class_list is None:
        raise CheckpointError(f"{path}: an encoder export keeps no class names; give its class list file "
                              f"({head['num_classes']} names, one per line; AudioSet's from "
                              "examples/prepare/labels.py)")
    names = read_class_list(class_list)
    if len(names) != int(head["num_classes"]):
        raise CheckpointError(f"{class_list}: {len(names)} classes, but the head of {path} has "
                              f"{head['num_classes']} outputs")
    bundle = load_encoder_with_stats(path)
    arch = bundle.encoder.config
    cfg = MamClapClassifierConfig(**{name: arch[arg] for name, arg in MODEL_CONFIG_FIELDS.items()},
                                  num_classes=len(names), pooling="mean")
    weights = {f"encoder.{k}": v for k, v in bundle.encoder.state_dict().items()}  # before fc_norm replaces norm
    weights.update({k: state["model"][k] for k in head_keys(state)})
    model = MamClapClassifier(cfg, bundle.encoder)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: head weights do not match a mean-pooling classifier: "
                              f"missing {missing}, unexpected {unexpected}")
    length = bundle.target_length or arch["max_frames"]
    task = MamClapFinetuningTask(MamClapFinetuningConfig(
        data=os.path.dirname(os.path.abspath(class_list)), class_list=os.path.basename(class_list),
        target_length=length, norm_stats=f"{bundle.norm_mean!r},{bundle.norm_std!r}"), from_checkpoint=True)
    task.state.merge_state_dict({"class_names": names})
    return Classifier(model.eval(), task, head.get("loss", "bce"))


def windows(wav: torch.Tensor, clf: Classifier) -> torch.Tensor:
    """(S,) 16 kHz waveform -> (W, 1, target_length, 128) normalised fbank windows."""
    length = clf.target_length
    count = max(1, math.ceil(num_fbank_frames(wav.shape[0]) / length))
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
    target = multi_hot(labels, len(clf.class_names))
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
