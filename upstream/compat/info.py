"""Shim: ``torchaudio.info`` through soundfile (removed in torchaudio 2.9)."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

from ._patch import mark, set_attr


class AudioMetaData(NamedTuple):
    """What ``torchaudio.info`` returned (the fields s3prl reads)."""

    sample_rate: int
    num_frames: int
    num_channels: int
    bits_per_sample: int
    encoding: str


_SUBTYPE_INFO = {
    "PCM_16": (16, "PCM_S"), "PCM_24": (24, "PCM_S"), "PCM_32": (32, "PCM_S"),
    "PCM_U8": (8, "PCM_U"), "PCM_S8": (8, "PCM_S"), "FLOAT": (32, "PCM_F"), "DOUBLE": (64, "PCM_F"),
}


def soundfile_info(uri, format: Optional[str] = None, buffer_size: int = 4096,
                   backend: Optional[str] = None) -> AudioMetaData:
    """``torchaudio.info`` with soundfile."""
    import soundfile

    if hasattr(uri, "__fspath__"):
        uri = os.fspath(uri)
    i = soundfile.info(uri)
    bits, enc = _SUBTYPE_INFO.get(i.subtype, (0, i.subtype or "UNKNOWN"))
    if i.format == "FLAC":
        enc = "FLAC"
    return AudioMetaData(int(i.samplerate), int(i.frames), int(i.channels), bits, enc)


def shim_info() -> bool:
    """Add ``torchaudio.info`` (soundfile-based) where torchaudio no longer has it.

    Prevents ``AttributeError: module 'torchaudio' has no attribute 'info'`` in
    ``s3prl.util.audio_info`` and the ``s3prl.problem`` recipes (e.g. superb_ks), which read
    ``sample_rate``, ``num_frames``, ``num_channels``, ``bits_per_sample`` and ``encoding``.
    """
    import torchaudio

    if hasattr(torchaudio, "info"):
        return False
    set_attr(torchaudio, "info", mark(soundfile_info))
    return True
