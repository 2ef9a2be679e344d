"""The clip-caption dataset of the caption teacher (``clap_teacher`` task)."""
from __future__ import annotations

import logging

import numpy as np
import torch
from fairseq.data import FairseqDataset

from ..modules.precision import carry_exact
from .audio import AudioError, load_teacher_audio
from .captions import split_captions
from .manifest import Manifest, PackedRows

logger = logging.getLogger("mam_clap_plugin.data")


class CaptionDataset(FairseqDataset):
    """(clip, caption) pairs: the clip as the teacher's input waveform, one caption as a string.

    Args:
        manifest: the split's manifest.
        captions: its ``.cap`` lines (:func:`read_captions`).
        sample_rate, num_samples: the model's input (``num_samples`` at ``sample_rate``, the
            clip's start, zero-padded).
        sample_captions: draw one caption per clip and epoch (training); else the first.
        seed: seeds the draws with the epoch and the clip index.
        shuffle: ``ordered_indices`` is a random permutation (else manifest order).
        skip_bad_files: drop unreadable clips with a warning instead of raising.
    """

    def __init__(self, manifest: Manifest, captions: PackedRows, sample_rate: int, num_samples: int,
                 sample_captions: bool = False, seed: int = 1, shuffle: bool = False, skip_bad_files: bool = False):
        super().__init__()
        if len(captions) != len(manifest):
            raise ValueError(f"{manifest.path}: {len(captions)} caption lines for {len(manifest)} entries")
        self.manifest, self.captions = manifest, captions
        self.sample_rate, self.num_samples = sample_rate, num_samples
        self.sample_captions, self.seed, self.shuffle = sample_captions, seed, shuffle
        self.skip_bad_files = skip_bad_files
        self.epoch = 1
        #: (batch size, ranks) when training keeps only full batches, a multiple of the ranks per epoch
        self.full_batches: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.manifest)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption(self, index: int) -> str:
        """The caption of clip ``index`` this epoch."""
        options = split_captions(self.captions[index], f"caption line {index + 1}")
        if not self.sample_captions or len(options) == 1:
            return options[0]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return options[int(rng.integers(len(options)))]

    def __getitem__(self, index) -> dict | None:
        index = int(index)
        try:
            wav = load_teacher_audio(self.manifest.full_path(index), self.sample_rate, self.num_samples,
                                     where=self.manifest.where(index))
        except AudioError as err:
            if not self.skip_bad_files:
                raise
            logger.warning("skipping bad audio file: %s", err)
            return None
        return {"id": index, "wav": wav, "caption": self.caption(index)}

    def collater(self, samples: list) -> dict:
        """``{"id": (B,), "nsentences": B, "ntokens": B, "num_skipped", "net_input": {"wav": (B,
        num_samples) float32 carried as int32 bits (fairseq's fp16/bf16 batch cast leaves it exact;
        the model restores it), "captions": [B strings]}}``; {} when every clip was skipped."""
        kept = [s for s in samples if s is not None]
        if not kept:
            return {}
        return {
            "id": torch.tensor([s["id"] for s in kept], dtype=torch.long),
            "nsentences": len(kept),
            "ntokens": len(kept),
            "num_skipped": len(samples) - len(kept),
            "net_input": {"wav": carry_exact(torch.stack([s["wav"] for s in kept])),
                          "captions": [s["caption"] for s in kept]},
        }

    def num_tokens(self, index: int) -> int:
        return 1

    def size(self, index: int) -> int:
        return 1

    @property
    def sizes(self) -> np.ndarray:
        return np.ones(len(self), dtype=np.int64)

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        return np.ones(len(indices), dtype=np.int64)

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return not self.shuffle

    def ordered_indices(self) -> np.ndarray:
        return np.random.permutation(len(self)) if self.shuffle else np.arange(len(self))

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        """fairseq's batches; with :attr:`full_batches` = (B, W) only batches of exactly B clips,
        as many as a multiple of W (the ranks), so that every training step of W ranks sees W x B
        clips (a short last batch, or a rank left with fairseq's dummy batch, would change the other
        ranks' contrastive loss)."""
        batches = super().batch_by_size(indices, max_tokens, max_sentences, required_batch_size_multiple)
        if self.full_batches is None:
            return batches
        size, ranks = self.full_batches
        full = [b for b in batches if len(b) == size]
        full = full[: len(full) - len(full) % ranks]
        if not full:
            raise ValueError(f"{self.manifest.path}: {len(self)} clips give no training step of {ranks} x "
                             f"{size} clips (dataset.batch_size x ranks): lower dataset.batch_size")
        if len(full) < len(batches):
            logger.info(f"{self.manifest.path}: {len(batches) - len(full)} of {len(batches)} batches left out this "
                        f"epoch (only full global batches of {ranks} x {size} clips train)")
        return full
