"""Fine-tuning task (registered as ``mam_clap_finetuning``): clip classification.

Reads, from ``task.data``, the same files as pretraining:
    ``{split}.tsv``        fairseq wav2vec manifest (first line: root dir)
    ``{split}.{labels}``   comma-separated class ids per manifest line (required)
    ``{class_list}``       the class names (id = line index)
    ``{split}.{sample_weights}``  optional, one weight per clip, for the training split
                           (``examples/finetuning/sample_weights.py``; AudioSet-2M)

Training-split augmentations (AudioMAE's recipe, see :mod:`mam_clap_plugin.data.augment`):
waveform mixup (``mixup``, ``mixup_alpha``), roll + gain (``roll_gain``) and SpecAugment
on the fbank (``freqm``, ``timem``). The patch-token time/frequency masking lives in
the model (``model.mask_t_prob`` / ``model.mask_f_prob``).

The class names are saved in the checkpoint's task state, so a fine-tuned checkpoint
names its classes without the data (``examples/predict.py``); rebuilding the task from
a checkpoint needs no data directory.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.tasks import register_task
from omegaconf import II, MISSING, open_dict

from ..data.audio import resolve_norm_stats
from ..data.finetuning import Augmentation, FinetuningDataset
from ..data.manifest import ManifestError, read_class_list, read_labels, read_manifest
from ..data.sampling import read_weights
from ..models.encoder_config import ARCHITECTURE
from ..modules.encoder import PATCH_SIZE
from .base import FbankTask, FbankTaskConfig

logger = logging.getLogger(__name__)


@dataclass
class MamClapFinetuningConfig(FbankTaskConfig):
    data: str = field(default=MISSING, metadata={"help": "directory holding {split}.tsv, {split}.lbl, classes.txt"})
    labels: str = field(default="lbl", metadata={"help": "label file extension: {split}.EXT"})
    class_list: str = field(default="classes.txt", metadata={"help": "class list inside task.data, one name per line"})
    target_length: int = field(
        default=1024,
        metadata={"help": "fbank frames per clip after padding or cropping (multiple of 16; AudioSet 1024, "
                          "ESC-50 512, Speech Commands 128)"},
    )
    norm_stats: str = field(
        default="audioset", metadata={"help": "fbank normalisation: audioset, esc50, speech_commands, or 'MEAN,STD'"}
    )
    mixup: float = field(
        default=0.0, metadata={"help": "probability of mixing a training clip with another (AudioMAE 0.5)"}
    )
    mixup_alpha: float = field(default=10.0, metadata={"help": "mixup lambda ~ Beta(alpha, alpha)"})
    roll_gain: bool = field(
        default=False, metadata={"help": "random circular shift and Beta(10,10)+0.5 gain of the training waveform"}
    )
    freqm: int = field(default=0, metadata={"help": "SpecAugment frequency-mask width in bins (0 = off; AudioMAE 48)"})
    timem: int = field(default=0, metadata={"help": "SpecAugment time-mask width in frames (0 = off; AudioMAE 192)"})
    sample_weights: Optional[str] = field(
        default=None,
        metadata={"help": "weight file extension ({train split}.EXT): draw epoch_size clips per epoch in proportion "
                          "to the weights (AudioSet-2M); unset = a permutation of the split"},
    )
    epoch_size: int = field(default=0, metadata={"help": "clips per epoch with sample_weights (0 = the split's size)"})
    # filled from the run's config (the YAML base lists them as ${dataset.train_subset} / ${common.seed})
    train_subset: str = II("dataset.train_subset")  # the split that gets augmentations and weighted sampling
    seed: int = II("common.seed")  # seeds the per-clip augmentation draws


@register_task("mam_clap_finetuning", dataclass=MamClapFinetuningConfig)
class MamClapFinetuningTask(FbankTask):
    cfg: MamClapFinetuningConfig

    def __init__(self, cfg: MamClapFinetuningConfig, from_checkpoint: bool = False):
        super().__init__(cfg)
        if cfg.target_length <= 0 or cfg.target_length % PATCH_SIZE:
            raise ValueError(f"task.target_length={cfg.target_length} must be a positive multiple of {PATCH_SIZE}")
        for name in ("mixup", "epoch_size", "freqm", "timem"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"task.{name}={getattr(cfg, name)} must be >= 0")
        if cfg.mixup > 1:
            raise ValueError(f"task.mixup={cfg.mixup} is a probability: it must be in [0, 1]")
        self.norm_mean, self.norm_std = resolve_norm_stats(cfg.norm_stats)
        names = []
        if not from_checkpoint:  # a saved checkpoint brings its class names in the task state
            if not os.path.isdir(cfg.data):
                raise FileNotFoundError(f"task.data: directory {cfg.data!r} does not exist")
            names = read_class_list(self.class_list_path)
        self.state.merge_state_dict({"class_names": names})

    @classmethod
    def setup_task(cls, cfg: MamClapFinetuningConfig, from_checkpoint: bool = False, **kwargs):
        return cls(cfg, from_checkpoint=from_checkpoint)

    @property
    def class_list_path(self) -> str:
        return os.path.join(self.cfg.data, self.cfg.class_list)

    @property
    def class_names(self) -> list:
        return list(self.state.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.state.class_names)

    def check_class_list(self, names: list, where: str) -> None:
        """Refuse a class list (from ``where``) that differs from this task's (the checkpoint's head)."""
        if list(names) != self.class_names:
            differ = next((i for i, (a, b) in enumerate(zip(names, self.class_names)) if a != b),
                          min(len(names), len(self.class_names)))
            raise ManifestError(
                f"{where}: {len(names)} classes do not match the checkpoint's {len(self.class_names)} classes "
                f"(first difference at id {differ}); evaluate with the class list the model was fine-tuned on"
            )

    def build_model(self, cfg, from_checkpoint: bool = False):
        """Fill ``model.num_classes`` from the class list and check the input length fits.

        The encoder architecture read from ``model.model_path`` is written back into the
        run's config (saved in checkpoints). Rebuilt from a checkpoint (``from_checkpoint``),
        the encoder's weights come from that checkpoint, so ``model.model_path`` (the
        pretraining file) is not read again.
        """
        with open_dict(cfg):
            if cfg.get("num_classes", 0) <= 0:
                cfg.num_classes = self.num_classes
            elif self.num_classes and cfg.num_classes != self.num_classes:
                raise ValueError(
                    f"{self.class_list_path}: {self.num_classes} classes, but model.num_classes={cfg.num_classes}"
                )
            if from_checkpoint:
                cfg.model_path = None
        if not from_checkpoint and not cfg.get("model_path"):
            logger.info("encoder randomly initialised (model.model_path unset)")
        model = super().build_model(cfg, from_checkpoint)
        with open_dict(cfg):
            for key in ARCHITECTURE:
                cfg[key] = model.cfg[key]
        longest = model.encoder.grid_time * PATCH_SIZE
        if self.cfg.target_length > longest:
            raise ValueError(
                f"task.target_length={self.cfg.target_length} is longer than the encoder's position table "
                f"({longest} frames, model.max_frames); use at most {longest}"
            )
        return model

    def load_dataset(self, split: str, combine: bool = False, **kwargs):
        cfg = self.cfg
        manifest = read_manifest(os.path.join(cfg.data, f"{split}.tsv"))
        labels = read_labels(os.path.join(cfg.data, f"{split}.{cfg.labels}"), len(manifest), self.num_classes)
        train = split == cfg.train_subset
        weights = None
        if train and cfg.sample_weights:
            weights = read_weights(os.path.join(cfg.data, f"{split}.{cfg.sample_weights}"), len(manifest))
        augment = Augmentation(cfg.mixup, cfg.mixup_alpha, cfg.roll_gain, cfg.freqm, cfg.timem) if train else None
        dataset = FinetuningDataset(
            manifest, target_length=cfg.target_length, norm_mean=self.norm_mean, norm_std=self.norm_std,
            labels=labels, num_classes=self.num_classes, skip_bad_files=cfg.skip_bad_files, shuffle=train,
            augment=augment, sample_weights=weights, epoch_size=cfg.epoch_size,
        )
        dataset.seed = cfg.seed
        self.datasets[split] = dataset
        logger.info(
            f"{split}: {len(manifest)} clips from {manifest.path}"
            + (f", {dataset.epoch_size} weighted draws per epoch" if weights is not None else "")
            + (f", augmentation {augment._asdict()}" if augment is not None and augment.active else "")
        )
