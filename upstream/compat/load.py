"""Shim: ``torchaudio.load`` / ``torchaudio.save`` through soundfile when torchcodec is absent."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch

from ._patch import MARK, mark, set_attr


def _torchcodec_available() -> bool:
    return importlib.util.find_spec("torchcodec") is not None


_INT_SUBTYPES = {"PCM_16": "int16", "PCM_32": "int32"}


def soundfile_load(
    uri,
    frame_offset: int = 0,
    num_frames: int = -1,
    normalize: bool = True,
    channels_first: bool = True,
    format: Optional[str] = None,
    buffer_size: int = 4096,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, int]:
    """``torchaudio.load`` with soundfile: ``((channels, frames) float32, sample_rate)``.

    ``normalize=False`` returns int16/int32 samples for 16/32-bit PCM files (as torchaudio's
    sox/soundfile backends did) and float32 otherwise; ``channels_first=False`` returns
    (frames, channels).
    """
    import soundfile

    if hasattr(uri, "__fspath__"):
        uri = os.fspath(uri)
    with soundfile.SoundFile(uri) as f:
        rate = f.samplerate
        dtype = "float32" if normalize else _INT_SUBTYPES.get(f.subtype, "float32")
        if frame_offset:
            f.seek(frame_offset)
        data = f.read(frames=num_frames, dtype=dtype, always_2d=True)
    wav = torch.from_numpy(data)
    if channels_first:
        wav = wav.t()
    return wav.contiguous(), rate


_SAVE_SUBTYPES = {
    ("PCM_S", 16): "PCM_16", ("PCM_S", 24): "PCM_24", ("PCM_S", 32): "PCM_32",
    ("PCM_U", 8): "PCM_U8", ("PCM_F", 32): "FLOAT", ("PCM_F", 64): "DOUBLE",
}


def soundfile_save(
    uri,
    src: torch.Tensor,
    sample_rate: int,
    channels_first: bool = True,
    format: Optional[str] = None,
    encoding: Optional[str] = None,
    bits_per_sample: Optional[int] = None,
    buffer_size: int = 4096,
    backend: Optional[str] = None,
    compression=None,
) -> None:
    """``torchaudio.save`` with soundfile. 1-D input is one channel; the file format comes
    from ``format`` or the extension; default WAV subtype 16-bit PCM (as torchaudio), or
    ``encoding``/``bits_per_sample`` when given."""
    import soundfile

    if hasattr(uri, "__fspath__"):
        uri = os.fspath(uri)
    data = src.detach().cpu()
    if data.dim() == 1:
        data = data[None] if channels_first else data[:, None]
    if channels_first:
        data = data.t()
    subtype = None
    if encoding is not None or bits_per_sample is not None:
        subtype = _SAVE_SUBTYPES.get((encoding or "PCM_S", bits_per_sample or 16))
    elif data.dtype in (torch.float32, torch.float64) and str(uri).lower().endswith(".wav"):
        subtype = "PCM_16"
    arr = data.numpy()
    if arr.dtype.kind == "f":
        arr = arr.astype("float32")
    soundfile.write(uri, arr, sample_rate, subtype=subtype, format=format)


def shim_load() -> bool:
    """Replace ``torchaudio.load`` / ``torchaudio.save`` by soundfile versions when torchcodec
    is not installed.

    Prevents ``ImportError: TorchCodec is required for load_with_torchcodec. Please install
    torchcodec to use this function.`` (and the ``save_with_torchcodec`` equivalent):
    torchaudio 2.9+ routes ``load``/``save`` through torchcodec, which is not a dependency
    here. s3prl's runner, datasets and problems call ``torchaudio.load(path)`` and expect
    ``((channels, frames) float32 in [-1, 1], sample_rate)``, which :func:`soundfile_load`
    returns.
    """
    import torchaudio

    if _torchcodec_available() or getattr(torchaudio.load, MARK, False):
        return False
    set_attr(torchaudio, "load", mark(soundfile_load))
    set_attr(torchaudio, "save", mark(soundfile_save))
    return True
