"""File-level helpers below every loader: safe torch reading, safetensors reading, sha256.

:mod:`mam_clap_plugin.checkpoint` (encoder files) and :mod:`mam_clap_plugin.teacher`
(CLAP checkpoints) both read files through this module, which imports neither of them,
so neither imports the other. Nothing here imports fairseq or s3prl.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import struct
from typing import Any, Dict

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not from this plugin."""


def read_torch_file(path: str, trusted: bool = False, *, safe_globals: tuple = (), error=CheckpointError,
                    what: str = "checkpoint", trust_hint: str = "trusted=True") -> Any:
    """``torch.load`` onto the CPU with ``weights_only=True`` (plus ``safe_globals``) unless
    ``trusted``; every failure raises ``error`` naming ``path`` (a refused pickle also says how
    to opt in: ``trust_hint``)."""
    if not os.path.isfile(path):
        raise error(f"{path}: {what} not found")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        raise error(
            f"{path}: holds pickled objects that torch's weights-only loader refuses "
            f"({str(err).splitlines()[0]}). If you trust this file, load it with {trust_hint} "
            "(weights_only=False)."
        ) from err
    except (RuntimeError, EOFError, OSError, struct.error) as err:
        raise error(f"{path}: not a readable torch checkpoint ({err})") from err


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
