"""What keeps "run the same command again" working after a kill or a full disk.

fairseq 0.12 saves a checkpoint by writing the first name it needs (``checkpoint_2_400.pt``,
say) as ``NAME.tmp`` and renaming it, then *copying* that file onto the other names
(``checkpoint_best.pt``, ``checkpoint_last.pt``) with ``shutil.copyfile``, which truncates the
destination first: a kill or a full disk during that copy leaves ``checkpoint_last.pt``
broken, and the rerun that should resume crashes on it. A failed ``torch.save`` leaves a
partial ``NAME.tmp`` and is retried three times.

:func:`install` (called by the plugin's tasks, so it is in place before fairseq's ``train``
loads or saves anything, in every process) changes two names in ``fairseq.checkpoint_utils``:

* ``torch_persistent_save`` and the ``PathManager.copy`` that ``save_checkpoint`` uses write
  every checkpoint file as ``NAME.tmp-PID`` in the same directory, flush it to disk and
  ``os.replace`` it onto ``NAME``: each name holds either its previous file or the new one,
  whole, at every moment. A write that fails (``ENOSPC``, ``EFBIG``) removes the temporary
  file and raises an ``OSError`` naming ``NAME`` (and for a copy the bytes it needed); the
  previous ``NAME`` is left as it was. Paths that need fairseq's ``PathManager`` (remote
  file systems) and asynchronous writes keep fairseq's own code.
* ``load_checkpoint`` (called once, before training, with the trainer) first checks the
  run: a ``checkpoint_last.pt`` that cannot be read (truncated or emptied by another
  program, a damaged disk) is logged, and the newest intact checkpoint in the directory,
  by update count (``checkpoint_E_U.pt``, ``checkpoint_best.pt``, ``checkpointE.pt``), is
  resumed instead; with none, the run stops naming the file. Temporary files of a save that
  a kill interrupted (``NAME.tmp-PID``, PID no longer running) are deleted; the task checks
  the state it saved in the checkpoint (the pretraining task: the target source) before the
  model is loaded. It also warns when
  ``lr_scheduler.warmup_updates`` >= ``optimization.max_update`` (the lr would never leave
  its warmup ramp).
"""
from __future__ import annotations

import glob
import logging
import os
import pickle
import re
import shutil
from typing import Optional

import torch

from ..files import CheckpointError, atomic_write, error_reason, fairseq_checkpoint_globals, remove_file, torch_save

logger = logging.getLogger(__name__)

#: fairseq's checkpoint names in ``checkpoint.save_dir`` (``crash.pt`` and others are left out).
CHECKPOINT_NAME = re.compile(r"^checkpoint(_last|_best|\d+|_\d+_\d+|\.best_.*)\.pt$")

_ORIGINAL: dict = {}


def _needs_path_manager(path: str) -> bool:
    from fairseq.file_io import PathManager

    return PathManager.path_requires_pathmanager(path)


def torch_persistent_save(obj, filename, async_write: bool = False):
    """fairseq's ``checkpoint_utils.torch_persistent_save``, atomic (see :func:`atomic_write`)."""
    if async_write or _needs_path_manager(filename):
        return _ORIGINAL["torch_persistent_save"](obj, filename, async_write=async_write)
    atomic_write(filename, lambda tmp: torch_save(obj, tmp))


def _path_manager():
    """fairseq's ``PathManager`` whose ``copy`` writes atomically (for ``checkpoint_utils`` only)."""
    from fairseq.file_io import PathManager

    class AtomicCopyPathManager(PathManager):
        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if _needs_path_manager(src_path) or _needs_path_manager(dst_path):
                return PathManager.copy(src_path, dst_path, overwrite)
            atomic_write(dst_path, lambda tmp: shutil.copyfile(src_path, tmp), nbytes=os.path.getsize(src_path))
            return True

    return AtomicCopyPathManager


def read_head(path: str) -> Optional[dict]:
    """A fairseq checkpoint without its tensors (memory-mapped, weights-only with the fairseq
    globals): what the resume checks read. None when the file is readable but holds pickled
    objects that weights-only loading refuses (fairseq's own load says so then). Raises
    CheckpointError naming ``path`` when it is damaged, truncated or empty."""
    try:
        with torch.serialization.safe_globals(fairseq_checkpoint_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            return None
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
    except Exception as err:  # truncated, empty, not a zip archive...
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CheckpointError(f"{path}: not a readable checkpoint ({size} bytes: {error_reason(err)})") from err


def _updates(state) -> int:
    try:
        return int(state["optimizer_history"][-1]["num_updates"])
    except (KeyError, IndexError, TypeError, ValueError):
        return -1


def checkpoint_updates(path: str) -> Optional[int]:
    """The update count saved in a fairseq checkpoint (-1 if it holds none; None: see :func:`read_head`)."""
    state = read_head(path)
    return None if state is None else _updates(state)


def newest_intact_checkpoint(save_dir: str, skip: str) -> Optional[tuple[str, int]]:
    """(path, updates) of the checkpoint in ``save_dir`` (fairseq's names, but ``skip``) with the
    most updates that reads back; the newest file on a tie. None if there is none."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(save_dir), "checkpoint*.pt")):
        if not CHECKPOINT_NAME.match(os.path.basename(path)) or os.path.abspath(path) == os.path.abspath(skip):
            continue
        try:
            updates = checkpoint_updates(path)
        except CheckpointError as err:
            logger.warning(f"not resuming from {err}")
            continue
        if updates is not None:
            found.append((updates, os.path.getmtime(path), path))
    if not found:
        return None
    updates, _, path = max(found)
    return path, updates


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def remove_orphans(save_dir: str) -> None:
    """Delete ``checkpoint*.pt.tmp-PID`` files in ``save_dir`` left by a process that was killed
    while saving (one per kill, each as large as a checkpoint); a live PID's file is kept."""
    for path in glob.glob(os.path.join(glob.escape(save_dir), "checkpoint*.pt.tmp-*")):
        pid = path.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            logger.info(f"removing {path}, left by a save that did not finish")
            remove_file(path)


def warn_short_warmup(cfg) -> None:
    """Warn when the lr warmup does not end before ``optimization.max_update``."""
    warmup = (cfg.get("lr_scheduler") or {}).get("warmup_updates", 0) or 0
    max_update = cfg.optimization.get("max_update", 0) or 0
    if max_update > 0 and warmup >= max_update:
        logger.warning(
            f"lr_scheduler.warmup_updates={warmup} >= optimization.max_update={max_update}: the lr never leaves "
            f"its warmup ramp (it reaches {max_update / warmup:.2g} of optimization.lr={list(cfg.optimization.lr)}). "
            "Scale lr_scheduler.warmup_updates with max_update (the pretraining configs warm up for 45,000 of "
            "480,000 updates, about 9%)"
        )


def load_checkpoint(cfg, trainer, **passthrough_args):
    """fairseq's ``checkpoint_utils.load_checkpoint`` after the startup checks (module docstring)."""
    from omegaconf import open_dict

    original = _ORIGINAL["load_checkpoint"]
    warn_short_warmup(trainer.cfg)
    if os.path.isdir(cfg.save_dir):
        remove_orphans(cfg.save_dir)
    last = os.path.join(cfg.save_dir, "checkpoint_last.pt")
    if (cfg.restore_file != "checkpoint_last.pt" or trainer.checkpoint_suffix or cfg.get("finetune_from_model")
            or not os.path.exists(last)):
        return original(cfg, trainer, **passthrough_args)
    try:
        _check_task_state(trainer.task, read_head(last))
    except CheckpointError as err:
        problem = err
    else:  # a CheckpointError from fairseq's own loading below is not "checkpoint_last.pt is unreadable"
        return original(cfg, trainer, **passthrough_args)
    fallback = newest_intact_checkpoint(cfg.save_dir, skip=last)
    if fallback is None:
        raise CheckpointError(
            f"{problem}; no other intact checkpoint in {cfg.save_dir} to resume from. Move the file away to "
            "start this run afresh"
        )
    path, updates = fallback
    logger.warning(f"cannot resume from {problem}; resuming from {path} ({updates} updates), the newest intact "
                   f"checkpoint in {cfg.save_dir}")
    _check_task_state(trainer.task, read_head(path))
    with open_dict(cfg):
        cfg.restore_file = path
    try:
        return original(cfg, trainer, **passthrough_args)
    finally:
        with open_dict(cfg):
            cfg.restore_file = "checkpoint_last.pt"


def _check_task_state(task, state: Optional[dict]) -> None:
    """Give the task the state it saved (``get_checkpoint_dict``) before fairseq loads the model:
    the pretraining task refuses another teacher's targets there, before a mismatch of the
    model's shapes could be the first thing the user reads (fairseq hands it over again later)."""
    extra = (state or {}).get("extra_state") or {}
    saved = extra.get(type(task).__name__)
    if saved and hasattr(task, "set_checkpoint_dict"):
        task.set_checkpoint_dict(saved)


def install() -> None:
    """Put the atomic saves and the startup checks into ``fairseq.checkpoint_utils`` (once per process)."""
    from fairseq import checkpoint_utils

    if _ORIGINAL:
        return
    _ORIGINAL.update(torch_persistent_save=checkpoint_utils.torch_persistent_save,
                     load_checkpoint=checkpoint_utils.load_checkpoint, PathManager=checkpoint_utils.PathManager)
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.load_checkpoint = load_checkpoint
    checkpoint_utils.PathManager = _path_manager()
