"""fairseq dataset of fixed-length log-mel fbanks with optional labels and teacher targets.

What crosses the data loader per clip: the normalised fbank (or, with ``fbank_on_device``,
the decoded mono waveform at the file's own rate: :func:`on_device` then resamples it and
computes the fbank on the model's device, and an online teacher's input from the same
samples), and offline teacher targets as the store's own float16 map (grid_freq, grid_time,
dim), aligned to the student grid on the device by :func:`on_device` too.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch
from fairseq.data import FairseqDataset

from ..modules.precision import carry_exact, exact
from .alignment import Alignment, align_tokens, loss_mask, real_time_patches
from .audio import (
    NORM_STATS,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    AudioError,
    AudioNotFoundError,
    batch_fbank,
    batch_resample,
    frames_to_samples,
    load_audio,
    load_native_audio,
    load_student_and_teacher_audio,
    normalize_fbank,
    resampled_length,
    wav_to_fbank,
)
from .manifest import Manifest, PackedRows
from .target_store import TargetStore

logger = logging.getLogger("mam_clap_plugin.data")

_DEFAULT_MEAN, _DEFAULT_STD = NORM_STATS["audioset"]


class SkipsBadFiles:
    """What the plugin's datasets share for ``skip_bad_files`` (mixed into :class:`MamClapDataset`
    and :class:`~.caption_dataset.CaptionDataset`; they set ``manifest`` and ``skip_bad_files``).

    * :meth:`_load_or_skip`: an item, or with ``skip_bad_files`` a bad file's skipped item
      ``{"id", "skipped": message, "skipped_file": "manifest:line: path"}`` (logged as a warning);
      without, the AudioError (naming the manifest's missing root directory when that is the cause);
    * :meth:`_batch_head`: a batch's clips and its counts (``num_skipped``, ``skipped_share``,
      ``skipped_files``, ``skipped_reason``); when every clip was skipped, one
      :meth:`placeholder_item` (id -1) with ``nsentences`` 0 (:func:`is_skipped_batch`), never ``{}``,
      so that the task counts the clips against ``task.max_skipped_fraction`` and every process
      still runs its forward and backward (:class:`~mam_clap_plugin.tasks.base.FbankTask`).
    """

    manifest: Manifest
    skip_bad_files: bool

    @property
    def clips_per_epoch(self) -> int:
        """Clips one epoch draws from this dataset (the bound of ``task.max_skipped_fraction``)."""
        return len(self)

    def placeholder_item(self) -> dict:
        """An item of zeros shaped like a real one, with id -1 (see :meth:`_batch_head`)."""
        raise NotImplementedError

    def _explain(self, err: AudioError) -> AudioError:
        """``err``, plus the likely cause when the manifest's root directory (its line 1) does not exist."""
        root = self.manifest.root
        if isinstance(err, AudioNotFoundError) and not os.path.isdir(root):
            return AudioError(f"{err}; the manifest's root directory {root!r} ({self.manifest.path}:1) does not "
                              "exist: fix line 1 of the manifest (relative roots resolve against the directory "
                              "training starts in)")
        return err

    def _load_or_skip(self, index: int, load: Callable[[int], dict]) -> dict:
        """``load(index)``; on an AudioError, with skip_bad_files the skipped item of ``index``, else the error."""
        try:
            return load(index)
        except AudioError as err:
            err = self._explain(err)
            if not self.skip_bad_files:
                raise err from None
            logger.warning("skipping bad audio file: %s", err)
            return {"id": index, "skipped": str(err),
                    "skipped_file": f"{self.manifest.where(index)}: {self.manifest.full_path(index)}"}

    def _batch_head(self, samples: list[dict | None]) -> tuple[list[dict], dict]:
        """(the items to batch, the batch's counts) of a non-empty list of items, skipped items
        (``{"id", "skipped"}``, or None) dropped and counted: ``{"id": (B,) long, "nsentences": B,
        "ntokens": B, "num_skipped": int, "skipped_share": float (skipped clips /
        :attr:`clips_per_epoch`)}``, with skipped clips ``"skipped_files": ["manifest:line: path"]``
        and ``"skipped_reason"``: the first one's error. When every item was skipped, the items are
        one :meth:`placeholder_item` and ``nsentences`` is 0 (see :func:`is_skipped_batch`)."""
        kept = [s for s in samples if s is not None and "skipped" not in s]
        skipped = [s for s in samples if s is not None and "skipped" in s]
        num_skipped = len(samples) - len(kept)
        clips = len(kept)
        if not kept:
            kept = [self.placeholder_item()]
        batch = {
            "id": torch.tensor([s["id"] for s in kept], dtype=torch.long),
            "nsentences": clips,
            "ntokens": clips,
            "num_skipped": num_skipped,
            "skipped_share": num_skipped / max(self.clips_per_epoch, 1),
        }
        if skipped:
            batch["skipped_files"] = [s["skipped_file"] for s in skipped]
            batch["skipped_reason"] = skipped[0]["skipped"]
        return kept, batch


class MamClapDataset(SkipsBadFiles, FairseqDataset):
    """Clips of a manifest as normalised (target_length, 128) fbanks.

    Every item has the same size (``target_length`` frames), so batching is by count.

    Args:
        manifest: the split's manifest.
        target_length: fbank frames per clip (zero-pad / crop).
        norm_mean, norm_std: fbank normalisation stats, ``(x - mean) / (2 * std)``.
        labels: class ids per manifest entry (from ``read_labels``), or None.
        num_classes: size of the multi-hot label vector; required with ``labels``.
        target_store: offline teacher targets aligned with the manifest, or None.
        teacher_input: ``(sample_rate, num_samples)`` of an online teacher: items then carry
            its input waveform (the clip's first ``num_samples`` at ``sample_rate``).
        alignment: teacher cell of each student token; required with a store or an online
            teacher (batches then carry the per-token ``target_mask``).
        freq_patches: frequency patches of the student grid (for ``target_mask``).
        skip_bad_files: on an unusable audio file (missing, unreadable, empty, truncated
            against the manifest's sample count, non-finite), log a warning and drop the item
            instead of raising; batches count the dropped clips (see :meth:`collater`).
        shuffle: ``ordered_indices`` returns a random permutation (else manifest order).
        fbank_on_device: items carry the decoded waveform at the file's own rate instead of
            the fbank (and of the teacher's input); batches then need :func:`on_device` (with
            ``teacher_input``) before the model sees them.
    """

    def __init__(
        self,
        manifest: Manifest,
        target_length: int = 1024,
        norm_mean: float = _DEFAULT_MEAN,
        norm_std: float = _DEFAULT_STD,
        labels: PackedRows | list[list[int]] | None = None,
        num_classes: int = 0,
        target_store: TargetStore | None = None,
        teacher_input: tuple[int, int] | None = None,
        alignment: Alignment | None = None,
        freq_patches: int = 8,
        skip_bad_files: bool = False,
        shuffle: bool = True,
        fbank_on_device: bool = False,
    ):
        super().__init__()
        if labels is not None:
            if len(labels) != len(manifest):
                raise ValueError(f"{manifest.path}: {len(labels)} label rows for {len(manifest)} entries")
            if num_classes < 1:
                raise ValueError(f"{manifest.path}: labels given but num_classes={num_classes}")
        if target_store is not None and teacher_input is not None:
            raise ValueError("give either a target store or an online teacher's input, not both")
        if (target_store is not None or teacher_input is not None) and alignment is None:
            raise ValueError("teacher targets need the student alignment")
        self.bad_target_clips: frozenset = frozenset()
        if target_store is not None:
            target_store.check(len(manifest))
            self.bad_target_clips = frozenset(target_store.check_complete().tolist())
        self.manifest = manifest
        self.target_length = target_length
        self.norm_mean = norm_mean
        self.norm_std = norm_std
        self.labels = labels if labels is None or isinstance(labels, PackedRows) else PackedRows.of_ids(labels)
        self.num_classes = num_classes
        self.target_store = target_store
        self.teacher_input = teacher_input
        self.alignment = alignment
        self.freq_patches = freq_patches
        self.skip_bad_files = skip_bad_files
        self.shuffle = shuffle
        self.fbank_on_device = fbank_on_device

    def __len__(self) -> int:
        return len(self.manifest)

    def _multi_hot(self, index: int) -> torch.Tensor:
        """(num_classes,) float multi-hot vector of entry ``index``."""
        label = torch.zeros(self.num_classes)
        label[torch.from_numpy(self.labels[index])] = 1.0
        return label

    def _fbank(self, wav: torch.Tensor) -> torch.Tensor:
        """(target_length, 128) normalised fbank of a 16 kHz waveform."""
        return normalize_fbank(wav_to_fbank(wav, self.target_length), self.norm_mean, self.norm_std)

    def _load(self, index: int) -> dict:
        """Fbank (and teacher input) of entry ``index``; raises AudioError."""
        path, where = self.manifest.full_path(index), self.manifest.where(index)
        expected = int(self.manifest.sizes[index])
        if index in self.bad_target_clips:
            raise AudioError(f"{where}: {path}: marked unusable by the target extractor ({self.target_store.path})")
        item = {"id": index}
        if self.fbank_on_device:  # decode and downmix only: resampling and the fbank run on the device
            wav, rate = load_native_audio(path, self.target_length, self.teacher_input, where=where,
                                          expected_samples=expected)
            student = min(wav.shape[0], frames_to_samples(self.target_length, rate))
            item.update(audio=wav, rate=rate, student_samples=student)
            item["real_patches"] = real_time_patches(resampled_length(student, rate, SAMPLE_RATE), self.target_length)
            return item
        if self.teacher_input is not None:
            wav, item["teacher_wav"] = load_student_and_teacher_audio(
                path, self.target_length, *self.teacher_input, where=where, expected_samples=expected)
        else:
            wav = load_audio(path, max_frames=self.target_length, where=where, expected_samples=expected)
        item["source"] = self._fbank(wav)
        item["real_patches"] = real_time_patches(wav.shape[0], self.target_length)
        return item

    def __getitem__(self, index) -> dict:
        """Item dict (see collater); with skip_bad_files, a bad file gives ``{"id", "skipped": message,
        "skipped_file": "manifest:line: path"}`` (:meth:`SkipsBadFiles._load_or_skip`)."""
        index = int(index)
        item = self._load_or_skip(index, self._load)
        if "skipped" in item:
            return item
        if self.labels is not None and "label" not in item:  # augmented items bring their mixed label
            item["label"] = self._multi_hot(index)
        if self.target_store is not None:
            item["target"] = torch.from_numpy(np.array(self.target_store[index]))  # the store's fp16 map
        return item

    def placeholder_item(self) -> dict:
        """An item of zeros shaped like a real one, with id -1: what a batch whose clips were all
        skipped carries, so that every process still runs its forward and backward (the task
        multiplies that loss by 0 and counts the clips; see :func:`is_skipped_batch`)."""
        samples = frames_to_samples(self.target_length, SAMPLE_RATE)
        item = {"id": -1, "real_patches": real_time_patches(samples, self.target_length)}
        if self.fbank_on_device:
            item.update(audio=torch.zeros(samples), rate=SAMPLE_RATE, student_samples=samples)
        else:
            item["source"] = torch.zeros(self.target_length, NUM_MEL_BINS)
            if self.teacher_input is not None:
                item["teacher_wav"] = torch.zeros(self.teacher_input[1])
        if self.labels is not None:
            item["label"] = torch.zeros(self.num_classes)
        if self.target_store is not None:
            item["target"] = torch.zeros(self.target_store.header.clip_shape, dtype=torch.float16)
        return item

    def collater(self, samples: list[dict | None]) -> dict:
        """Batch items; skipped items (``{"id", "skipped"}``, or None) are dropped and counted.

        Returns:
            {} for no items at all (fairseq's padding of uneven shards), else ``{"id": (B,) long,
            "nsentences": B, "ntokens": B, "num_skipped": int, "skipped_share": float (skipped
            clips / :attr:`clips_per_epoch`), with skipped clips "skipped_files": ["manifest:line: path"]
            and "skipped_reason": the first one's error,
            "net_input": {"source": (B, 1, target_length, 128)}}``. When every item was skipped,
            the batch holds one :meth:`placeholder_item` with ``nsentences`` 0 (see
            :func:`is_skipped_batch`). With ``fbank_on_device``, instead of ``net_input``: ``"audio"``
            (B, S) float32 as int32 bits, the clips at their own rates zero-padded; ``"audio_lengths"``
            (B,) the student's samples of each; ``"audio_rates"`` a list of B ints, host-side; and with
            an online teacher ``"teacher_audio_lengths"`` (B,), the teacher's samples) plus
            ``"label"``: (B, num_classes) float, with labels;
            ``"target"``: (B, grid_freq, grid_time, dim) float16 teacher maps (the store's
            values), with a target store (:func:`on_device` aligns them);
            ``"teacher_wav"``: (B, num_samples) float32 carried as int32 bits
            (:func:`~mam_clap_plugin.modules.precision.exact` restores it), with an online
            teacher (without ``fbank_on_device``);
            ``"target_mask"``: (B, N) bool, with either: True where a token enters the
            target loss (not pure padding, and inside the teacher's clip).
        """
        if not samples:
            return {}
        kept, batch = self._batch_head(samples)
        if self.fbank_on_device:
            lengths = [s["audio"].shape[0] for s in kept]
            audio = torch.zeros(len(kept), max(lengths))
            for row, s in zip(audio, kept):
                row[: s["audio"].shape[0]] = s["audio"]
            # as int32 bits, like the teacher's waveform: fairseq's fp16/bf16 batch cast leaves it exact
            batch["audio"] = carry_exact(audio)
            batch["audio_lengths"] = torch.tensor([s["student_samples"] for s in kept], dtype=torch.long)
            batch["audio_rates"] = [s["rate"] for s in kept]  # a list: fairseq's device copy leaves it on the host
            if self.teacher_input is not None:
                batch["teacher_audio_lengths"] = torch.tensor(lengths, dtype=torch.long)
        else:
            batch["net_input"] = {"source": torch.stack([s["source"] for s in kept]).unsqueeze(1)}
        if self.labels is not None:
            batch["label"] = torch.stack([s["label"] for s in kept])
        if self.target_store is not None:
            batch["target"] = torch.stack([s["target"] for s in kept])
        if self.teacher_input is not None and not self.fbank_on_device:
            # as int32 bits, so fairseq's fp16/bf16 batch cast leaves the waveform exact (see modules.precision)
            batch["teacher_wav"] = carry_exact(torch.stack([s["teacher_wav"] for s in kept]))
        if self.alignment is not None:
            real = torch.tensor([s["real_patches"] for s in kept], dtype=torch.long)
            batch["target_mask"] = loss_mask(real, self.alignment.covered, self.freq_patches)
        return batch

    def num_tokens(self, index: int) -> int:
        return self.target_length

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        return np.full(len(indices), self.target_length, dtype=np.int64)

    def size(self, index: int) -> int:
        return self.target_length

    @property
    def sizes(self) -> np.ndarray:
        """(len,) int64, every entry ``target_length``."""
        return np.full(len(self), self.target_length, dtype=np.int64)

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        """False when shuffling: fairseq then draws a fresh permutation every epoch under
        ``numpy_seed(seed + epoch)``, which also makes a resumed run see the same batches."""
        return not self.shuffle

    def ordered_indices(self) -> np.ndarray:
        """Random permutation (fairseq seeds numpy around this call) or manifest order."""
        if self.shuffle:
            return np.random.permutation(len(self))
        return np.arange(len(self))


def is_skipped_batch(sample: dict) -> bool:
    """True for a batch whose clips were all skipped: it holds a placeholder and ``nsentences`` 0
    (:meth:`SkipsBadFiles._batch_head`)."""
    return bool(sample) and sample.get("nsentences", 1) == 0 and "num_skipped" in sample


def on_device(sample: dict, target_length: int, norm_mean: float, norm_std: float, alignment: Alignment | None,
              dtype: torch.dtype = torch.float32, teacher_input: tuple[int, int] | None = None) -> dict:
    """Finish a batch of :class:`MamClapDataset` on its device (after fairseq moved it there).

    * ``audio`` / ``audio_lengths`` / ``audio_rates`` (``fbank_on_device``) become
      ``net_input["source"]``: the clips resampled to 16 kHz (one kernel per rate, cached per
      device), then (B, 1, target_length, 128) normalised fbanks in ``dtype`` (the model's, as
      fairseq's own cast of ``net_input`` under common.fp16/bf16): the same as the workers' fbank;
    * with ``teacher_input`` = the online teacher's ``(sample_rate, num_samples)``, the same
      samples also become its input ``teacher_wav`` (B, num_samples) float32, as the workers'
      :func:`~.audio.load_student_and_teacher_audio` gives it;
    * float16 teacher maps ``target`` (B, grid_freq, grid_time, dim) become the aligned
      (B, N, dim) float32 targets (the alignment index is cached per device).

    Idempotent: a finished batch passes through unchanged (fairseq may run a step twice).
    """
    if "teacher_audio_lengths" in sample and teacher_input is None:  # checked before the batch is changed
        raise ValueError("on_device: the batch carries an online teacher's audio but no teacher_input "
                         "(sample_rate, num_samples) was given")
    audio = sample.pop("audio", None)
    if audio is not None:
        audio, rates = exact(audio), sample.pop("audio_rates")
        # the student's samples end by frames_to_samples(target_length, rate) <= this bound (host-side)
        student = audio[:, : frames_to_samples(target_length, max(rates))]
        wav, lengths = batch_resample(student, sample.pop("audio_lengths"), rates, SAMPLE_RATE)
        fbank = batch_fbank(wav, lengths, target_length)
        sample["net_input"] = {"source": normalize_fbank(fbank, norm_mean, norm_std).unsqueeze(1).to(dtype)}
        teacher_lengths = sample.pop("teacher_audio_lengths", None)
        if teacher_lengths is not None:
            rate, num_samples = teacher_input
            sample["teacher_wav"], _ = batch_resample(audio, teacher_lengths, rates, rate, width=num_samples)
    target = sample.get("target")
    if target is not None and target.dim() == 4:
        sample["target"] = align_tokens(target, alignment).float()
    return sample
