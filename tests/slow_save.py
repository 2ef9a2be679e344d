"""``fairseq-hydra-train`` whose Nth write of ``checkpoint_last.pt`` stalls half-way, for the kill
tests of ``tests/test_faults.py`` (a helper script, not a test module).

    SLOW_SAVE_AT=2 SLOW_SAVE_MARK=/tmp/mark python tests/slow_save.py --config-dir ... OVERRIDES

Every write whose destination's name contains ``checkpoint_last`` (fairseq's copy onto it, or a
``torch.save`` into it or into its temporary file) is counted; the ``SLOW_SAVE_AT``-th writes
half of its bytes, flushes them, creates ``SLOW_SAVE_MARK`` (its text: the destination) and
sleeps: the test then kills the process, as a pre-empted job is killed in the middle of a save.
Without ``SLOW_SAVE_AT`` it is plain ``fairseq-hydra-train``.
"""
import io
import os
import shutil
import sys
import time

import torch

AT = int(os.environ.get("SLOW_SAVE_AT", "0"))
MARK = os.environ.get("SLOW_SAVE_MARK", "")
_count = [0]
_copyfile, _save = shutil.copyfile, torch.save


def _stall(dst, data: bytes) -> None:
    """Write half of ``data`` into ``dst``, flush it, say where, and wait to be killed."""
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    with open(MARK, "w") as f:
        f.write(str(dst))
    time.sleep(600)


def _is_target(dst) -> bool:
    dst = getattr(dst, "name", dst)  # a file object: its path
    if not isinstance(dst, (str, os.PathLike)) or "checkpoint_last" not in os.path.basename(os.fspath(dst)):
        return False
    _count[0] += 1
    return _count[0] == AT


def slow_copyfile(src, dst, *args, **kwargs):
    if _is_target(dst):
        with open(src, "rb") as f:
            _stall(dst, f.read())
    return _copyfile(src, dst, *args, **kwargs)


def slow_save(obj, f, *args, **kwargs):
    if _is_target(f):
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        _stall(getattr(f, "name", f), buffer.getvalue())
    return _save(obj, f, *args, **kwargs)


if __name__ == "__main__":
    if AT:
        shutil.copyfile, torch.save = slow_copyfile, slow_save
    from fairseq_cli.hydra_train import cli_main

    sys.argv[0] = "fairseq-hydra-train"
    sys.exit(cli_main())
