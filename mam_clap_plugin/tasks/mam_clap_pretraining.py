"""Pretraining task (registered as ``mam_clap_pretraining``).

Reads, from ``task.data``:
    ``{split}.tsv``           fairseq wav2vec manifest (first line: root dir)
    ``{split}.{labels}``      optional, comma-separated class ids per manifest line
    ``{class_list}``          optional, the class names (id = line index)
and from ``task.target_store`` the optional ``{split}.tgt`` teacher-target stores.
Each part is needed only by the variants that use it: labels for the
classification branch, teacher targets for ``model.target=clap``.

Teacher targets come from one of two places:

* offline (``task.target_store``): stores written by
  ``examples/prepare/extract_clap_targets.py``. Their headers must match
  ``task.teacher_layer`` / ``task.teacher_projection`` and, when
  ``task.teacher_checkpoint`` is also set, that file's sha256.
* online (``task.teacher_checkpoint`` alone): the CLAP teacher runs inside training, in
  ``train_step`` / ``valid_step``. It is held by the task, not the model: frozen, in eval
  mode, outside the optimizer, outside saved checkpoints and outside ``model.train()``.

Checkpoints record where their targets came from (the teacher's name, checkpoint sha256, layer
and projection, and whether a store or the online teacher gave them); resuming with targets
of another teacher is refused unless ``task.allow_target_source_change=true``.

Offline targets cross the data loader as the store's float16 maps; ``train_step`` /
``valid_step`` align them to the student grid on the model's device. With
``task.fbank_on_device=true`` the workers only read and downmix the audio, and resampling,
the fbank and its normalisation (and an online teacher's resampling) run there too, batched
(:func:`..data.dataset.on_device`).
"""

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from omegaconf import MISSING, open_dict

from ..data.alignment import align_tokens, alignment
from ..data.audio import resolve_norm_stats
from ..data.dataset import MamClapDataset, on_device
from ..data.manifest import read_class_list, read_labels, read_manifest
from ..data.target_store import TargetStoreError, check_one_teacher, open_target_store
from ..files import file_sha256
from ..modules.encoder import PATCH_SIZE
from ..modules.precision import exact
from ..teacher import load_teacher
from .base import FbankTask, FbankTaskConfig

logger = logging.getLogger(__name__)

FREQ_PATCHES = 128 // PATCH_SIZE
TEACHER_LAYERS = ChoiceEnum(["final", "stage3"])


@dataclass
class MamClapPretrainingConfig(FbankTaskConfig):
    data: str = field(default=MISSING, metadata={"help": "directory holding the {split}.tsv manifests"})
    labels: Optional[str] = field(
        default=None, metadata={"help": "label file extension ({split}.EXT, e.g. lbl); unset = no labels"}
    )
    class_list: str = field(
        default="classes.txt", metadata={"help": "class list inside task.data, one name per line (used with labels)"}
    )
    target_store: Optional[str] = field(
        default=None, metadata={"help": "directory holding {split}.tgt teacher-target stores (offline targets)"}
    )
    teacher_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "teacher checkpoint (LAION-CLAP .pt, MS-CLAP 2023, or a caption teacher trained with "
                          "examples/teacher: any format of mam_clap_plugin.teacher.registry). Alone: run the teacher "
                          "online; with target_store: the stores must have been extracted from this file (sha256)"},
    )
    teacher_trusted: bool = field(
        default=False,
        metadata={"help": "allow a full unpickle (weights_only=False) of a teacher checkpoint that holds more than "
                          "tensors and numpy scalars; only for files you trust"},
    )
    teacher_layer: TEACHER_LAYERS = field(  # type: ignore
        default="final", metadata={"help": "teacher map: final (2x32xC) or stage3 (4x64xC/2); stores must match"}
    )
    teacher_projection: bool = field(
        default=False, metadata={"help": "apply CLAP's audio_projection per token (final map only); stores must match"}
    )
    target_length: int = field(
        default=1024,
        metadata={"help": "fbank frames per clip after padding or cropping; a multiple of 64 for the pretraining "
                          "model (its decoder window: model.decoder_window_time=4 time patches of 16 frames)"},
    )
    norm_stats: str = field(
        default="audioset",
        metadata={"help": "fbank normalisation: audioset, esc50, speech_commands, or 'MEAN,STD'"},
    )
    allow_target_source_change: bool = field(
        default=False,
        metadata={"help": "resume a checkpoint whose teacher targets came from another teacher (checkpoint sha256, "
                          "layer or projection) than this run's store or online teacher; refused otherwise"},
    )
    fbank_on_device: bool = field(
        default=False,
        metadata={"help": "data loader workers only read and downmix the audio; resampling (to 16 kHz, and to an "
                          "online teacher's rate), the fbank and its normalisation run batched in "
                          "train_step/valid_step on the model's device (same values as the workers' path within "
                          "float rounding; the waveform crosses at the file's own rate, as int32 bits under "
                          "common.fp16/bf16, so the batch cast leaves it exact)"},
    )


@register_task("mam_clap_pretraining", dataclass=MamClapPretrainingConfig)
class MamClapPretrainingTask(FbankTask):
    """Cheap to build: the constructor reads no file.

    ``fairseq.checkpoint_utils.load_model_ensemble_and_task`` rebuilds this task from a
    checkpoint's saved config on any machine, so the data directory, the class list, the
    target stores and the teacher checkpoint are only read when first needed: by
    ``load_dataset`` (every data check happens there), and by ``build_model`` for a model
    whose ``target_dim`` / ``num_classes`` are still 0 (a new run, not a saved checkpoint).
    """

    cfg: MamClapPretrainingConfig

    def __init__(self, cfg: MamClapPretrainingConfig):
        super().__init__(cfg)
        if cfg.target_length <= 0 or cfg.target_length % PATCH_SIZE:
            raise ValueError(
                f"task.target_length={cfg.target_length} must be a positive multiple of {PATCH_SIZE} frames "
                f"(whole patches); the pretraining model needs whole decoder windows too: a multiple of "
                f"{PATCH_SIZE} x model.decoder_window_time (64 with the default window of 4)"
            )
        self.norm_mean, self.norm_std = resolve_norm_stats(cfg.norm_stats)
        self._class_names: Optional[list] = None
        self._target_header = None
        self._teacher = None
        self._alignment = None
        self._target_source = None

    @classmethod
    def setup_task(cls, cfg: MamClapPretrainingConfig, **kwargs):
        return cls(cfg)

    def _data_path(self, name: str) -> str:
        if not os.path.isdir(self.cfg.data):
            raise FileNotFoundError(f"task.data: directory {self.cfg.data!r} does not exist")
        return os.path.join(self.cfg.data, name)

    @property
    def class_names(self) -> list:
        """Names from ``task.data/task.class_list`` (read once); [] without task.labels."""
        if self._class_names is None:
            self._class_names = read_class_list(self._data_path(self.cfg.class_list)) if self.cfg.labels else []
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def target_header(self):
        """Header shared by every store in task.target_store (read once); None without stores."""
        if self._target_header is None and self.cfg.target_store:
            self._target_header = self._read_store_header()
        return self._target_header

    @property
    def teacher(self):
        """The online teacher (task.teacher_checkpoint without task.target_store), loaded on first
        use through the teacher registry (:func:`mam_clap_plugin.teacher.load_teacher`); None otherwise."""
        cfg = self.cfg
        if self._teacher is None and cfg.teacher_checkpoint and not cfg.target_store:
            # building the teacher must not draw from the seeded RNG: the student's
            # initialisation and masks stay those of an offline run with the same seed
            with torch.random.fork_rng(devices=[]):
                self._teacher = load_teacher(cfg.teacher_checkpoint, cfg.teacher_layer, cfg.teacher_projection,
                                             trusted=cfg.teacher_trusted)
            logger.info(f"online teacher {self._teacher.name} ({cfg.teacher_layer}) from {cfg.teacher_checkpoint}")
        return self._teacher

    @property
    def teacher_input(self):
        """The online teacher's input ``(sample_rate, num_samples)``, or None (no online teacher)."""
        return (self.teacher.sample_rate, self.teacher.num_samples) if self.teacher is not None else None

    @property
    def target_dim(self) -> int:
        if self.target_header is not None:
            return self.target_header.dim
        return self.teacher.dim if self.teacher is not None else 0

    @property
    def alignment(self):
        """Teacher cell of each student token, or None without teacher targets."""
        if self._alignment is None:
            time_patches = self.cfg.target_length // PATCH_SIZE
            if self.target_header is not None:
                self._alignment = self.target_header.alignment(time_patches, FREQ_PATCHES)
            elif self.teacher is not None:
                t = self.teacher
                self._alignment = alignment(t.grid[0], t.grid[1], t.seconds, t.freq_edges_hz(), time_patches,
                                            FREQ_PATCHES)
        return self._alignment

    @property
    def target_source(self) -> Optional[dict]:
        """Where this run's teacher targets come from: ``{"kind": "store"|"online", "teacher",
        "checkpoint_sha256", "layer", "projection"}``; None without teacher targets."""
        if self._target_source is None:
            cfg = self.cfg
            if self.target_header is not None:
                h = self.target_header
                self._target_source = {"kind": "store", "teacher": h.teacher, "checkpoint_sha256": h.checkpoint_sha256,
                                       "layer": h.layer, "projection": h.projection}
            elif self.teacher is not None:
                self._target_source = {"kind": "online", "teacher": self.teacher.name,
                                       "checkpoint_sha256": file_sha256(cfg.teacher_checkpoint),
                                       "layer": str(cfg.teacher_layer), "projection": bool(cfg.teacher_projection)}
        return self._target_source

    def get_checkpoint_dict(self) -> dict:
        """Saved with every training checkpoint (fairseq's ``extra_state``): the target source."""
        return {type(self).__name__: {"target_source": self.target_source}}

    def set_checkpoint_dict(self, state: dict) -> None:
        """On resume: refuse targets from another teacher than the checkpoint's, unless
        ``task.allow_target_source_change``; say so when only the way they arrive changed."""
        saved, current = state.get("target_source"), self.target_source
        if not saved or not current:
            return
        differ = [k for k in ("teacher", "checkpoint_sha256", "layer", "projection") if saved.get(k) != current[k]]
        if differ and not self.cfg.allow_target_source_change:
            raise TargetStoreError(
                "the checkpoint being resumed was trained on targets of another teacher: "
                + "; ".join(f"{k} {saved.get(k)!r} ({saved.get('kind')}) vs {current[k]!r} ({current['kind']})"
                            for k in differ)
                + ". Resume with the same targets, start a new run (another checkpoint.save_dir), or set "
                "task.allow_target_source_change=true"
            )
        if differ:
            logger.warning(f"resuming with targets of another teacher ({', '.join(differ)} differ; "
                           "task.allow_target_source_change=true)")
        elif saved.get("kind") != current["kind"]:
            source = {"store": "a target store", "online": "the online teacher"}
            logger.info(f"resuming with the same teacher's targets, now from {source[current['kind']]} "
                        f"(the checkpoint's came from {source.get(saved.get('kind'), saved.get('kind'))})")

    def _read_store_header(self):
        """Header shared by every ``*.tgt`` store in task.target_store, checked against task.teacher_*."""
        root = self.cfg.target_store
        if not os.path.isdir(root):
            raise FileNotFoundError(f"task.target_store: directory {root!r} does not exist")
        first = check_one_teacher(root)
        if first is None:
            raise FileNotFoundError(f"task.target_store: no *.tgt files in {root!r}")
        where = f"task.target_store={root}"
        cfg = self.cfg
        if first.layer != cfg.teacher_layer:
            raise TargetStoreError(
                f"{where}: stores hold the {first.layer!r} map but task.teacher_layer={cfg.teacher_layer}"
            )
        if first.projection != cfg.teacher_projection:
            raise TargetStoreError(
                f"{where}: stores have projection={first.projection} but "
                f"task.teacher_projection={cfg.teacher_projection}"
            )
        if cfg.teacher_checkpoint:
            sha = file_sha256(cfg.teacher_checkpoint)
            if sha != first.checkpoint_sha256:
                raise TargetStoreError(
                    f"{where}: extracted from a checkpoint with sha256 {first.checkpoint_sha256[:12]}..., "
                    f"but task.teacher_checkpoint={cfg.teacher_checkpoint} has sha256 {sha[:12]}..."
                )
        return first

    def build_model(self, cfg, from_checkpoint: bool = False):
        """Check task.target_length against the model's decoder window, fill
        ``model.target_dim`` / ``model.num_classes`` from the data if still 0, and for a new
        run (not ``from_checkpoint``) load ``model.encoder_init``'s encoder.

        The sizes are written into the run's own config, so saved checkpoints rebuild without
        the data; a model rebuilt from a checkpoint (``load_model_ensemble_and_task``) gets
        its weights from that checkpoint and never reads ``model.encoder_init``.
        """
        window = cfg.get("decoder_window_time")
        if window and self.cfg.target_length % (PATCH_SIZE * window):
            raise ValueError(
                f"task.target_length={self.cfg.target_length} must be a multiple of {PATCH_SIZE * window} frames "
                f"for this model: its decoder attends in windows of model.decoder_window_time={window} time "
                f"patches of {PATCH_SIZE} frames"
            )
        with open_dict(cfg):
            if cfg.get("target") == "clap" and cfg.get("target_dim", 0) <= 0:
                cfg.target_dim = self.target_dim
            if cfg.get("classification_branch") and cfg.get("num_classes", 0) <= 0:
                cfg.num_classes = self.num_classes
        model = super().build_model(cfg, from_checkpoint)
        if cfg.get("encoder_init") and not from_checkpoint:
            mean, std = model.init_encoder(cfg.encoder_init)
            same = math.isclose(mean, self.norm_mean, rel_tol=1e-6) and math.isclose(std, self.norm_std, rel_tol=1e-6)
            if not same:
                raise ValueError(
                    f"model.encoder_init={cfg.encoder_init} was trained on fbanks normalised with mean {mean}, std "
                    f"{std}, but task.norm_stats={self.cfg.norm_stats} gives mean {self.norm_mean}, std "
                    f"{self.norm_std}: set task.norm_stats={mean},{std} (or the name of those stats)"
                )
        return model

    def load_dataset(self, split: str, combine: bool = False, **kwargs):
        """Read ``{split}.tsv`` (and labels, store or teacher input); all data checks happen here."""
        manifest = read_manifest(self._data_path(f"{split}.tsv"))
        labels = None
        if self.cfg.labels:
            labels = read_labels(
                os.path.join(self.cfg.data, f"{split}.{self.cfg.labels}"), len(manifest.paths), self.num_classes
            )
        store = None
        if self.cfg.target_store:
            store = open_target_store(os.path.join(self.cfg.target_store, f"{split}.tgt"))
        self.datasets[split] = MamClapDataset(
            manifest,
            target_length=self.cfg.target_length,
            norm_mean=self.norm_mean,
            norm_std=self.norm_std,
            labels=labels,
            num_classes=self.num_classes,
            target_store=store,
            teacher_input=self.teacher_input,
            alignment=self.alignment,
            freq_patches=FREQ_PATCHES,
            skip_bad_files=self.cfg.skip_bad_files,
            shuffle=split != "valid",
            fbank_on_device=self.cfg.fbank_on_device,
        )
        logger.info(f"{split}: {len(manifest.paths)} clips from {manifest.path}")

    def online_targets(self, sample: dict) -> dict:
        """Replace ``teacher_wav`` by the online teacher's aligned ``target`` (B, N, C).

        The teacher runs on the batch's device (frozen, see mam_clap_plugin.teacher.base): float32, or with its
        transformer under autocast to the batch's dtype under common.bf16 / common.fp16.
        """
        wav = sample.pop("teacher_wav", None)
        if self.teacher is None or wav is None:
            return sample
        wav = exact(wav)  # the dataset carries it past fairseq's fp16/bf16 batch cast
        # under common.bf16/fp16 (a half-precision batch) the teacher's transformer runs under autocast
        dtype = sample["net_input"]["source"].dtype
        self.teacher.autocast_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        if next(self.teacher.parameters()).device != wav.device:
            self.teacher.to(wav.device)
        sample["target"] = align_tokens(self.teacher(wav), self.alignment)
        return sample

    def on_device(self, sample: dict, model) -> dict:
        """The device-side end of the data path, on the batch fairseq moved to the model's
        device: resampling and the fbank (``task.fbank_on_device``), the offline targets' alignment, the
        online teacher's targets."""
        dtype = next(model.parameters()).dtype
        sample = on_device(sample, self.cfg.target_length, self.norm_mean, self.norm_std, self.alignment, dtype,
                           self.teacher_input)
        return self.online_targets(sample)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        return super().train_step(self.on_device(sample, model), model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        return super().valid_step(self.on_device(sample, model), model, criterion)
