"""Training a CLAP teacher from captions (registered as ``clap_teacher``).

Reads, from ``task.data``:
    ``{split}.tsv``      fairseq wav2vec manifest (first line: root dir)
    ``{split}.{captions}``  captions, line-aligned with the manifest (several per line separated
                         by `` ||| ``; see :mod:`mam_clap_plugin.data.captions`)
    ``{tokenizer}``      the sentencepiece model (``examples/teacher/train_tokenizer.py``), read when
                         a new model is built: its bytes go into the model (and every checkpoint)
Each clip is the first ``model.clip_seconds`` at ``model.sample_rate`` (zero-padded at the end).

Training draws one caption per clip and epoch; its batches are full ones only, a multiple of the
ranks per epoch, so that each step contrasts W x dataset.batch_size clips
(:meth:`CaptionDataset.batch_by_size`). With ``task.skip_bad_files`` unusable clips are skipped,
counted and bounded by ``task.max_skipped_fraction`` as in pretraining (:class:`.base.FbankTask`).
Validation uses each clip's first caption and logs the
retrieval recall of the whole split (``criterion=clap_infonce``).

Cheap to build: the constructor reads no file, so ``load_model_ensemble_and_task`` rebuilds the
task from a checkpoint's config without the data directory; the tokenizer comes with the model.
"""

import logging
import os
from dataclasses import dataclass, field

from fairseq.tasks import register_task
from omegaconf import II, MISSING, open_dict

from ..data.caption_dataset import CaptionDataset
from ..data.captions import read_captions
from ..data.dataset import is_skipped_batch
from ..data.manifest import read_manifest
from ..models.clap_teacher import placeholder_batch
from .base import FbankTask, FbankTaskConfig

logger = logging.getLogger(__name__)


@dataclass
class ClapTeacherTaskConfig(FbankTaskConfig):
    data: str = field(default=MISSING, metadata={"help": "directory holding {split}.tsv and {split}.cap"})
    captions: str = field(default="cap", metadata={"help": "caption file extension: {split}.EXT"})
    tokenizer: str = field(
        default="spm.model",
        metadata={"help": "sentencepiece model, relative to task.data or absolute (examples/teacher/train_tokenizer.py "
                          "writes DATA/spm.model); read only when a new model is built"},
    )
    # filled from the run's config (the YAML lists them as interpolations)
    sample_rate: int = II("model.sample_rate")
    clip_seconds: float = II("model.clip_seconds")
    train_subset: str = II("dataset.train_subset")  # the split that draws captions and keeps full batches only
    seed: int = II("common.seed")  # seeds the caption draws


class TokenizerError(FileNotFoundError):
    """The sentencepiece model is missing or unreadable; the message names the file."""


@register_task("clap_teacher", dataclass=ClapTeacherTaskConfig)
class ClapTeacherTask(FbankTask):
    cfg: ClapTeacherTaskConfig

    def __init__(self, cfg: ClapTeacherTaskConfig):
        super().__init__(cfg)
        self.tokenizer_bytes = None  # read by build_model for a new model

    @classmethod
    def setup_task(cls, cfg: ClapTeacherTaskConfig, **kwargs):
        return cls(cfg)

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.cfg.data, self.cfg.tokenizer)

    def read_tokenizer(self) -> tuple[bytes, int]:
        """(the sentencepiece model's bytes, its vocabulary size); TokenizerError naming the file."""
        import sentencepiece

        path = self.tokenizer_path
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: tokenizer (task.tokenizer) not found; train one with "
                                 f"examples/teacher/train_tokenizer.py {self.cfg.data} --vocab-size N")
        with open(path, "rb") as f:
            data = f.read()
        try:
            vocab = sentencepiece.SentencePieceProcessor(model_proto=data).get_piece_size()
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{path}: not a sentencepiece model ({err})") from err
        return data, vocab

    def build_model(self, cfg, from_checkpoint: bool = False):
        """A new model gets the tokenizer of task.tokenizer (its bytes, and ``model.vocab_size``,
        written into the run's config); rebuilt from a checkpoint (``from_checkpoint``) it gets
        the checkpoint's when its state dict is loaded, and no file is read."""
        if not from_checkpoint:
            self.tokenizer_bytes, vocab = self.read_tokenizer()
            with open_dict(cfg):
                if cfg.get("vocab_size", 0) <= 0:
                    cfg.vocab_size = vocab
                elif cfg.vocab_size != vocab:
                    raise ValueError(f"{self.tokenizer_path}: {vocab} pieces, but model.vocab_size={cfg.vocab_size}")
        return super().build_model(cfg, from_checkpoint)

    def load_dataset(self, split: str, combine: bool = False, **kwargs):
        """Read ``{split}.tsv`` and ``{split}.{captions}``; every data check happens here."""
        cfg = self.cfg
        if not os.path.isdir(cfg.data):
            raise FileNotFoundError(f"task.data: directory {cfg.data!r} does not exist")
        manifest = read_manifest(os.path.join(cfg.data, f"{split}.tsv"))
        captions = read_captions(os.path.join(cfg.data, f"{split}.{cfg.captions}"), len(manifest), manifest.path)
        train = split == cfg.train_subset
        num_samples = round(float(cfg.clip_seconds) * int(cfg.sample_rate))
        self.datasets[split] = CaptionDataset(manifest, captions, int(cfg.sample_rate), num_samples,
                                              sample_captions=train, seed=cfg.seed, shuffle=train,
                                              skip_bad_files=cfg.skip_bad_files)
        logger.info(f"{split}: {len(manifest)} clips from {manifest.path}, captions {cfg.captions}")

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """:meth:`FbankTask.train_step`; a placeholder batch (its clips all skipped) also stays out of
        the global batch statistics of ``bn0`` (:func:`placeholder_batch`)."""
        with placeholder_batch(model, is_skipped_batch(sample)):
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def get_batch_iterator(self, dataset, **kwargs):
        """Training keeps full global batches only (see :meth:`CaptionDataset.batch_by_size`)."""
        if isinstance(dataset, CaptionDataset) and dataset.shuffle and kwargs.get("max_sentences"):
            dataset.full_batches = (int(kwargs["max_sentences"]), int(kwargs.get("num_shards", 1)))
        elif kwargs.get("max_sentences") is None and isinstance(dataset, CaptionDataset):
            raise ValueError("the clap_teacher task needs dataset.batch_size (batches are counted in clips)")
        return super().get_batch_iterator(dataset, **kwargs)
