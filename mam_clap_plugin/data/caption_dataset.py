"""The clip-caption dataset of the caption teacher (``clap_teacher`` task)."""
from __future__ import annotations

import logging

import numpy as np
import torch
from fairseq.data import FairseqDataset

from ..modules.precision import carry_exact
from .audio import load_entry_teacher_audio
from .captions import split_captions
from .dataset import SkipsBadFiles
from .manifest import Manifest, PackedRows

logger = logging.getLogger("mam_clap_plugin.data")


class CaptionDataset(SkipsBadFiles, FairseqDataset):
    """(clip, caption) pairs: the clip as the teacher's input waveform, one caption as a string.

    Args:
        manifest: the split's manifest.
        captions: its ``.cap`` lines (:func:`read_captions`).
        sample_rate, num_samples: the model's input (``num_samples`` at ``sample_rate``, the
            clip's start, zero-padded).
        sample_captions: draw one caption per clip and epoch (training); else the first.
        seed: seeds the draws with the epoch and the clip index.
        shuffle: ``ordered_indices`` is a random permutation (else manifest order).
        skip_bad_files: on an unusable audio file (missing, unreadable, empty, truncated against
            the manifest's sample count, non-finite), log a warning and drop the item instead of
            raising; batches count the dropped clips, as :class:`~.dataset.MamClapDataset`'s
            (:class:`~.dataset.SkipsBadFiles`), and a batch whose clips were all skipped holds a
            :meth:`placeholder_item`.
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

    def _load(self, index: int) -> dict:
        """The item of clip ``index``; raises AudioError (naming the file and its manifest line)."""
        wav = load_entry_teacher_audio(self.manifest, index, self.sample_rate, self.num_samples)
        return {"id": index, "wav": wav, "caption": self.caption(index)}

    def __getitem__(self, index) -> dict:
        """``{"id", "wav": (num_samples,) float32, "caption": str}``; with skip_bad_files, a bad file
        gives ``{"id", "skipped": message, "skipped_file": "manifest:line: path"}``."""
        return self._load_or_skip(int(index), self._load)

    def placeholder_item(self) -> dict:
        """A zero waveform and an empty caption, with id -1: what a batch whose clips were all skipped
        carries (the task multiplies its loss by 0; the criterion leaves id -1 out of the contrast and
        of the retrieval metrics)."""
        return {"id": -1, "wav": torch.zeros(self.num_samples), "caption": ""}

    def collater(self, samples: list) -> dict:
        """{} for no items at all (fairseq's padding of uneven shards), else ``{"id": (B,),
        "nsentences": B, "ntokens": B, "num_skipped", "skipped_share"[, "skipped_files",
        "skipped_reason"], "net_input": {"wav": (B, num_samples) float32 carried as int32 bits
        (fairseq's fp16/bf16 batch cast leaves it exact; the model restores it), "captions": [B
        strings]}}``; skipped clips are dropped and counted, and when every clip was skipped the
        batch holds one :meth:`placeholder_item` with ``nsentences`` 0
        (:meth:`~.dataset.SkipsBadFiles._batch_head`)."""
        if not samples:
            return {}
        kept, batch = self._batch_head(samples)
        batch["net_input"] = {"wav": carry_exact(torch.stack([s["wav"] for s in kept])),
                              "captions": [s["caption"] for s in kept]}
        return batch

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
