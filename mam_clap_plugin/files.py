"""File-level helpers below every loader and writer: safe torch reading, safetensors reading,
sha256, and atomic writing (a temporary file, then ``os.replace``).

:mod:`mam_clap_plugin.checkpoint` (encoder files) and :mod:`mam_clap_plugin.teacher`
(CLAP checkpoints) both read files through this module, which imports neither of them,
so neither imports the other. The checkpoint saves of :mod:`mam_clap_plugin.tasks.resume`,
the encoder exports, ``adopt_adam`` and the target store write through it. Nothing here
imports fairseq or s3prl (only torch).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import shutil
from typing import Any, Callable, Dict, Optional

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not from this plugin."""


def numpy_scalar_globals() -> list:
    """numpy scalar and dtype classes, for ``safe_globals``: what checkpoints pickle besides
    tensors when an epoch or a metric was a numpy scalar. They rebuild plain values and run no
    code from the file."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType",
                                               "Int32DType", "BoolDType") if hasattr(np, "dtypes")]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def fairseq_checkpoint_globals() -> list:
    """The globals a fairseq training checkpoint may need beyond tensors and plain containers.

    A checkpoint written by this plugin's ``fairseq-hydra-train`` runs needs none (fairseq
    stores the config as a dict; its meters and optimizer states are dicts, lists and numbers;
    ``OrderedDict`` is in torch's own list): ``tests/test_faults.py`` saves one and checks.
    Older fairseq checkpoints keep their command line as ``argparse.Namespace`` (``args``), and
    a metric (``best``, ``val_loss``) may be a numpy scalar. All of them rebuild data only."""
    return [argparse.Namespace, *numpy_scalar_globals()]


def _refused_globals(path: str) -> list:
    """Names (``module.name``) of the globals in a torch file that the weights-only loader
    does not allow, read from the pickle's opcodes without running it; [] if unreadable."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # only used to word an error message
        return []


def error_reason(err: BaseException) -> str:
    """The first sentence of an error's first line (its type's name when it has no message): how
    the loaders word why a file did not read."""
    return str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__


def _describe_unreadable(path: str, err: BaseException) -> str:
    """Why ``path`` is not a torch file, in words (empty, not a zip archive or pickle, truncated)."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    reason = error_reason(err)
    if head == b"PK\x03\x04":
        return f"a damaged or truncated torch archive of {size} bytes ({reason})"
    if head[:1] != b"\x80":  # a pickle (torch's legacy format) starts with the PROTO opcode
        return f"neither a torch zip archive nor a pickle (it starts with {head!r})"
    return f"a damaged or truncated legacy torch file ({reason})"


def read_torch_file(path: str, trusted: bool = False, *, safe_globals=(), error=CheckpointError,
                    what: str = "checkpoint", trust_hint: str = "trusted=True") -> Any:
    """``torch.load`` onto the CPU with ``weights_only=True`` (plus ``safe_globals``) unless
    ``trusted``. Every failure raises ``error`` naming ``path``: missing, a directory, empty,
    not a torch file (a text file, say), truncated or damaged, or pickled objects that the
    weights-only loader refuses, whose globals it names (e.g. ``posix.system``) with how to
    opt in (``trust_hint``)."""
    if os.path.isdir(path):
        raise error(f"{path}: is a directory, not a {what} file")
    if not os.path.isfile(path):
        raise error(f"{path}: {what} not found")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if trusted or "weights only load failed" not in str(err).lower():
            raise error(f"{path}: not a readable torch {what}: {_describe_unreadable(path, err)}") from err
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in safe_globals if hasattr(g, "__qualname__")}
        refused = [g for g in _refused_globals(path) if g not in allowed]
        named = f"the global(s) {', '.join(refused)}" if refused else "objects it does not allow"
        raise error(
            f"{path}: holds pickled objects that torch's weights-only loader refuses ({named}); unpickling them "
            f"would run code the file names. If you trust this file, load it with {trust_hint} (weights_only=False)."
        ) from err
    except Exception as err:  # any other failure of torch.load: name the file
        raise error(f"{path}: not a readable torch {what}: {_describe_unreadable(path, err)}") from err


def is_safetensors(path: str) -> bool:
    """True if ``path`` starts like a safetensors file (8-byte header length, then ``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_safetensors(path: str, error=CheckpointError) -> tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors on the CPU, header metadata) of a safetensors file; failures raise ``error``."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise error(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{path}: not a readable safetensors file ({err})") from err


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def free_space(directory: str) -> str:
    """``N bytes free in DIRECTORY`` (``free space in DIRECTORY unknown`` when it cannot be read),
    for the message of a write that a full disk refused."""
    try:
        return f"{shutil.disk_usage(directory).free} bytes free in {directory}"
    except OSError:
        return f"free space in {directory} unknown"


def temporary_name(path: str) -> str:
    """``path.tmp-PID``: the temporary file that :func:`atomic_write` fills for ``path``."""
    return f"{path}.tmp-{os.getpid()}"


def remove_file(path: str) -> None:
    """Delete ``path`` if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write(path: str, write: Callable[[str], None], what: str = "checkpoint",
                 nbytes: Optional[int] = None) -> None:
    """Fill ``path`` through ``write(tmp)`` on a temporary file in the same directory, flushed to
    disk, then ``os.replace``: ``path`` holds its old content or the new one, never a part.

    On failure the temporary file is removed; an ``OSError`` (a full disk: ``ENOSPC``, a file
    size limit: ``EFBIG``) is raised again naming ``path`` (as ``PATH: WHAT not written``), the
    bytes needed when known (``nbytes``) and the space left, with the previous ``path`` unchanged.
    """
    tmp = temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        remove_file(tmp)
        free = free_space(os.path.dirname(os.path.abspath(path)))
        needed = f"{nbytes} bytes needed, " if nbytes is not None else ""
        kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
        raise OSError(err.errno, f"{path}: {what} not written: {err.strerror or err} ({needed}{free}); "
                                 f"{kept}") from err
    except BaseException:
        remove_file(tmp)
        raise


class _RecordingFile(io.RawIOBase):
    """A binary file that keeps the ``OSError`` of a failed write: ``torch.save`` reports a short
    write as a ``RuntimeError`` ("unexpected pos") that has lost its cause (ENOSPC, EFBIG)."""

    def __init__(self, f):
        super().__init__()
        self.file, self.name, self.error = f, f.name, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise


def torch_save(obj, path: str) -> None:
    """``torch.save(obj, path)``, raising the write's own ``OSError`` when the disk refused it."""
    with open(path, "wb") as f:
        recording = _RecordingFile(f)
        try:
            torch.save(obj, recording)
        except Exception:
            if recording.error is not None:
                raise recording.error from None
            raise
