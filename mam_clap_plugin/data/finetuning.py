"""Fine-tuning dataset: :class:`MamClapDataset` plus AudioMAE's training augmentations
and optional weighted sampling of the epoch's clips."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .alignment import real_time_patches
from .audio import load_audio, normalize_fbank, wav_to_fbank
from .augment import mix_labels, mix_waveforms, roll_and_gain, spec_augment
from .dataset import MamClapDataset
from .sampling import draw_epoch


class Augmentation(NamedTuple):
    """Training augmentations (see :mod:`.augment`); all off by default.

    mixup: probability that a clip is mixed with a random other clip of the split;
    mixup_alpha: lambda ~ Beta(alpha, alpha); roll_gain: AudioMAE's roll_mag_aug;
    freqm / timem: SpecAugment mask widths in bins / frames.
    """

    mixup: float = 0.0
    mixup_alpha: float = 10.0
    roll_gain: bool = False
    freqm: int = 0
    timem: int = 0

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.roll_gain or self.freqm > 0 or self.timem > 0


class FinetuningDataset(MamClapDataset):
    """A labelled split for fine-tuning.

    Args (besides those of :class:`MamClapDataset`, which needs ``labels``):
        augment: training augmentations, or None (validation, test).
        sample_weights: (len,) clip weights: ``ordered_indices`` then draws ``epoch_size``
            clips with replacement (see :mod:`.sampling`) instead of a permutation.
        epoch_size: clips per epoch with ``sample_weights`` (0 = the split's size).

    Augmentations draw from ``numpy.random.default_rng([seed, epoch, clip])``: ``seed``
    is set by the task from ``common.seed``, ``epoch`` by fairseq's ``set_epoch``.
    """

    def __init__(self, *args, augment: Optional[Augmentation] = None, sample_weights: Optional[np.ndarray] = None,
                 epoch_size: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.labels is None:
            raise ValueError(f"{self.manifest.path}: fine-tuning needs labels")
        if sample_weights is not None and len(sample_weights) != len(self):
            raise ValueError(f"{self.manifest.path}: {len(sample_weights)} sample weights for {len(self)} clips")
        self.augment = augment if augment is not None and augment.active else None
        self.sample_weights = sample_weights
        self.epoch_size = epoch_size or len(self)
        self.seed = 1
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def clips_per_epoch(self) -> int:
        return self.epoch_size if self.sample_weights is not None else len(self)

    def _wav(self, index: int):
        return load_audio(self.manifest.full_path(index), max_frames=self.target_length,
                          where=self.manifest.where(index), expected_samples=int(self.manifest.sizes[index]))

    def _load(self, index: int) -> dict:
        if self.augment is None:
            return super()._load(index)
        a = self.augment
        rng = np.random.default_rng([self.seed, self.epoch, index])
        wav, label = self._wav(index), self._multi_hot(index)
        if a.mixup > 0 and rng.random() < a.mixup:
            other = int(rng.integers(len(self)))
            lam = float(rng.beta(a.mixup_alpha, a.mixup_alpha))
            wav = mix_waveforms(wav, self._wav(other), lam)
            label = mix_labels(label, self._multi_hot(other), lam)
        if a.roll_gain:
            wav = roll_and_gain(wav, rng)
        fbank = spec_augment(wav_to_fbank(wav, self.target_length), a.freqm, a.timem, rng)
        return {
            "id": index,
            "source": normalize_fbank(fbank, self.norm_mean, self.norm_std),
            "label": label,
            "real_patches": real_time_patches(wav.shape[0], self.target_length),
        }

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return self.sample_weights is None and not self.shuffle

    def ordered_indices(self) -> np.ndarray:
        """``epoch_size`` weighted draws (with sample weights), else as :class:`MamClapDataset`."""
        if self.sample_weights is not None:
            return draw_epoch(self.sample_weights, self.epoch_size)
        return super().ordered_indices()
