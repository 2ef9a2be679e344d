"""What the plugin's tasks share: fixed-size fbank datasets with no dictionaries, loaded
without fairseq's prefetch thread when there are no workers; skipped clips counted and
bounded (``task.skip_bad_files``, ``task.max_skipped_fraction``); atomic checkpoint saves
and the resume checks (:mod:`.resume`)."""
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask

from ..data.dataset import is_skipped_batch
from . import resume

#: Default of ``task.max_skipped_fraction``.
MAX_SKIPPED_FRACTION = 0.01
MAX_SKIPPED_HELP = (
    "with skip_bad_files: stop with an error (naming the count and the first files) when more than this fraction "
    "of the clips of a training epoch, or of a validation pass, were skipped as unusable (all processes together); "
    "1 = never stop"
)
#: Skipped files an error names (the first ones of the epoch or validation pass, this process).
NAMED_SKIPS = 5


@dataclass
class FbankTaskConfig(FairseqDataclass):
    """The fields every task of the plugin has (the base of their configs): skipping bad audio."""

    skip_bad_files: bool = field(
        default=False, metadata={"help": "skip (and count) unreadable audio instead of stopping with an error"}
    )
    max_skipped_fraction: float = field(default=MAX_SKIPPED_FRACTION, metadata={"help": MAX_SKIPPED_HELP})


class SkippedFilesError(RuntimeError):
    """More clips were skipped than ``task.max_skipped_fraction`` allows."""


@dataclass
class SkipCount:
    """Skipped clips of one training epoch or validation pass (summed over processes)."""

    clips: int = 0
    share: float = 0.0  # skipped clips / the clips the phase draws
    first: List[str] = field(default_factory=list)  # this process's first files ("manifest:line: path")
    reason: str = ""  # the first one's error


class FbankTask(FairseqTask):
    """Base of ``mam_clap_pretraining``, ``mam_clap_finetuning`` and ``clap_teacher`` (not registered).

    Building one installs :func:`.resume.install` (atomic checkpoint files, the startup check
    of ``checkpoint_last.pt``) in the process: fairseq's ``train`` builds the task before it
    loads or saves a checkpoint, in every process of a distributed run.

    Skipped clips (``task.skip_bad_files``): every batch counts them (``num_skipped``, logged
    as ``skipped_files``). A batch whose clips were all skipped still runs the model on a
    placeholder of zeros, with its loss multiplied by 0 in training (as fairseq's own dummy
    batch: every process of a distributed run takes part in each update, and logs the same
    keys), and logs no clip, no loss and no loss weight. The counts of each training epoch and
    of each validation pass, summed over the processes, are compared with
    ``task.max_skipped_fraction`` of the clips that phase draws; beyond it the run stops with
    :class:`SkippedFilesError`, naming the count and the first files, in every process at the
    same update.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.max_skipped_fraction = cfg.max_skipped_fraction
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"task.max_skipped_fraction={self.max_skipped_fraction} must be in [0, 1]")
        resume.install()
        self._skips: Dict[str, SkipCount] = {"train": SkipCount(), "valid": SkipCount()}
        self._phase = "train"

    def begin_epoch(self, epoch, model):
        self._skips["train"] = SkipCount()
        super().begin_epoch(epoch, model)

    def begin_valid_epoch(self, epoch, model):
        self._skips["valid"] = SkipCount()
        super().begin_valid_epoch(epoch, model)

    def _note_skipped(self, sample: dict, phase: str) -> None:
        self._phase = phase
        count = self._skips[phase]
        count.first.extend(sample.get("skipped_files", [])[: NAMED_SKIPS - len(count.first)])
        count.reason = count.reason or sample.get("skipped_reason", "")

    @staticmethod
    def _no_clip_log(log: dict, sample: dict) -> dict:
        """The criterion's logging output for a placeholder batch, every value zeroed but the
        skipped clips: the same keys and value types as a real batch's, which fairseq needs to
        sum the outputs of all processes key by key."""
        out = {k: torch.zeros_like(v) if torch.is_tensor(v) else type(v)(0) for k, v in log.items()}
        out.update(num_skipped=sample["num_skipped"], skipped_share=sample["skipped_share"])
        return out

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self._note_skipped(sample, "train")
        skipped = is_skipped_batch(sample)
        # a placeholder's forward and backward keep every process in the update (loss x 0); its
        # one clip leaves BatchNorm's running statistics alone (Fp32BatchNorm1d)
        loss, sample_size, log = super().train_step(sample, model, criterion, optimizer, update_num,
                                                    ignore_grad or skipped)
        if skipped:
            return loss, 0, self._no_clip_log(log, sample)
        log["skipped_share"] = sample.get("skipped_share", 0.0)
        return loss, sample_size, log

    def valid_step(self, sample, model, criterion):
        self._note_skipped(sample, "valid")
        loss, sample_size, log = super().valid_step(sample, model, criterion)
        if is_skipped_batch(sample):  # the placeholder's scores are left out of mAP (its id is -1)
            return loss * 0, 0, self._no_clip_log(log, sample)
        log["skipped_share"] = sample.get("skipped_share", 0.0)
        return loss, sample_size, log

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        self._check_skipped(logging_outputs)

    def _check_skipped(self, logging_outputs) -> None:
        """Add this update's (or validation batch's) skipped clips to the phase's count; raise
        SkippedFilesError beyond ``task.max_skipped_fraction``."""
        clips = sum(int(log.get("num_skipped", 0)) for log in logging_outputs)
        if not clips:
            return
        count = self._skips[self._phase]
        count.clips += clips
        count.share += sum(float(log.get("skipped_share", 0.0)) for log in logging_outputs)
        limit = self.max_skipped_fraction
        if count.share > limit + 1e-9:
            drawn = round(count.clips / count.share) if count.share else 0
            where = "training epoch" if self._phase == "train" else "validation pass"
            named = (f"first skipped in this process: {', '.join(count.first)}; the first one's error: {count.reason}"
                     if count.first else "none of them in this process")
            raise SkippedFilesError(
                f"{count.clips} of the {drawn} clips of this {where} were skipped as unusable ({count.share:.1%}, "
                f"more than task.max_skipped_fraction={limit}); {named}. Fix those files or the manifest, or raise "
                "task.max_skipped_fraction"
            )

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
