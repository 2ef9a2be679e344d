"""Pretraining task (registered as ``mam_clap_pretraining``).

Reads, from ``task.data``:
    ``{split}.tsv``           fairseq wav2vec manifest (first line: root dir)
    ``{split}.{labels}``      optional, comma-separated class ids per manifest line
    ``{class_list}``          optional, the class names (id = line index)
and from ``task.target_store`` the optional ``{split}.tgt`` teacher-target stores.
Each part is needed only by the variants that use it: labels for the
classification branch, target stores for ``model.target=clap``.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import MISSING, open_dict

from ..data.audio import resolve_norm_stats
from ..data.dataset import MamClapDataset
from ..data.manifest import read_class_list, read_labels, read_manifest
from ..data.target_store import TargetStoreError, open_target_store
from ..modules.encoder import PATCH_SIZE

logger = logging.getLogger(__name__)

FREQ_PATCHES = 128 // PATCH_SIZE


@dataclass
class MamClapPretrainingConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory holding the {split}.tsv manifests"})
    labels: Optional[str] = field(
        default=None, metadata={"help": "label file extension ({split}.EXT, e.g. lbl); unset = no labels"}
    )
    class_list: str = field(
        default="classes.txt", metadata={"help": "class list inside task.data, one name per line (used with labels)"}
    )
    target_store: Optional[str] = field(
        default=None, metadata={"help": "directory holding {split}.tgt teacher-target stores (target=clap)"}
    )
    target_length: int = field(
        default=1024, metadata={"help": "fbank frames per clip after padding or cropping (multiple of 16)"}
    )
    norm_stats: str = field(
        default="audioset",
        metadata={"help": "fbank normalisation: audioset, esc50, speech_commands, or 'MEAN,STD'"},
    )
    skip_bad_files: bool = field(
        default=False, metadata={"help": "skip (and count) unreadable audio instead of stopping with an error"}
    )


@register_task("mam_clap_pretraining", dataclass=MamClapPretrainingConfig)
class MamClapPretrainingTask(FairseqTask):
    cfg: MamClapPretrainingConfig

    def __init__(self, cfg: MamClapPretrainingConfig):
        super().__init__(cfg)
        if not os.path.isdir(cfg.data):
            raise FileNotFoundError(f"task.data: directory {cfg.data!r} does not exist")
        if cfg.target_length <= 0 or cfg.target_length % PATCH_SIZE:
            raise ValueError(f"task.target_length={cfg.target_length} must be a positive multiple of {PATCH_SIZE}")
        self.norm_mean, self.norm_std = resolve_norm_stats(cfg.norm_stats)
        self.class_names = read_class_list(os.path.join(cfg.data, cfg.class_list)) if cfg.labels else []
        self.target_header = self._read_store_header() if cfg.target_store else None

    @classmethod
    def setup_task(cls, cfg: MamClapPretrainingConfig, **kwargs):
        return cls(cfg)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def target_dim(self) -> int:
        return self.target_header.dim if self.target_header is not None else 0

    def _read_store_header(self):
        """Header shared by every ``*.tgt`` store in task.target_store (they must agree)."""
        root = self.cfg.target_store
        if not os.path.isdir(root):
            raise FileNotFoundError(f"task.target_store: directory {root!r} does not exist")
        names = sorted(n for n in os.listdir(root) if n.endswith(".tgt"))
        if not names:
            raise FileNotFoundError(f"task.target_store: no *.tgt files in {root!r}")
        headers = {n: open_target_store(os.path.join(root, n)).header for n in names}
        first = headers[names[0]]
        for name, h in headers.items():
            if (h.teacher, h.dim, h.grid_freq, h.grid_time) != (first.teacher, first.dim, first.grid_freq, first.grid_time):
                raise TargetStoreError(
                    f"{os.path.join(root, name)}: teacher {h.teacher!r} grid {h.grid_freq}x{h.grid_time}x{h.dim} "
                    f"differs from {names[0]} ({first.teacher!r} {first.grid_freq}x{first.grid_time}x{first.dim})"
                )
        return first

    def build_model(self, cfg, from_checkpoint: bool = False):
        """Fill ``model.target_dim`` / ``model.num_classes`` from the data before building.

        Written into the run's own config, so saved checkpoints rebuild without the data.
        """
        with open_dict(cfg):
            if cfg.get("target") == "clap" and cfg.get("target_dim", 0) <= 0:
                cfg.target_dim = self.target_dim
            if cfg.get("classification_branch") and cfg.get("num_classes", 0) <= 0:
                cfg.num_classes = self.num_classes
        return super().build_model(cfg, from_checkpoint)

    def load_dataset(self, split: str, combine: bool = False, **kwargs):
        manifest = read_manifest(os.path.join(self.cfg.data, f"{split}.tsv"))
        labels = None
        if self.cfg.labels:
            labels = read_labels(
                os.path.join(self.cfg.data, f"{split}.{self.cfg.labels}"), len(manifest.paths), self.num_classes
            )
        store = None
        if self.cfg.target_store:
            store = open_target_store(os.path.join(self.cfg.target_store, f"{split}.tgt"))
            store.check(len(manifest.paths), self.target_dim)
        self.datasets[split] = MamClapDataset(
            manifest,
            target_length=self.cfg.target_length,
            norm_mean=self.norm_mean,
            norm_std=self.norm_std,
            labels=labels,
            num_classes=self.num_classes,
            target_store=store,
            time_patches=self.cfg.target_length // PATCH_SIZE,
            freq_patches=FREQ_PATCHES,
            skip_bad_files=self.cfg.skip_bad_files,
            shuffle=split != "valid",
        )
        logger.info(f"{split}: {len(manifest.paths)} clips from {manifest.path}")

    def get_batch_iterator(self, dataset, **kwargs):
        """fairseq's batch iterator, without its prefetch thread when there are no workers.

        With ``dataset.num_workers=0`` fairseq's ``BufferedIterator`` thread would run this
        dataset's torch work (fbank, resampling) itself; a process that finishes while
        that thread is inside torch aborts at exit ("terminate called without an active
        exception"). Loading in the main thread avoids it; with workers nothing changes.
        """
        if kwargs.get("num_workers", 0) == 0:
            kwargs["data_buffer_size"] = 0
        return super().get_batch_iterator(dataset, **kwargs)

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
