"""Shim: no-op ``torchaudio.set_audio_backend`` / ``get_audio_backend`` (removed in torchaudio 2.9)."""
from __future__ import annotations

from typing import Optional

from ._patch import mark, set_attr


def shim_set_audio_backend() -> bool:
    """Add no-op ``torchaudio.set_audio_backend`` / ``get_audio_backend``.

    Prevents ``AttributeError: module 'torchaudio' has no attribute 'set_audio_backend'``,
    raised at import time by ``s3prl/upstream/byol_s/byol_a/common.py`` (so by
    ``import s3prl.hub``) and by ``s3prl.run_downstream.main``. torchaudio 2.9 removed the
    backend dispatch; file I/O goes through :func:`shim_load`'s soundfile functions.
    """
    import torchaudio

    if hasattr(torchaudio, "set_audio_backend"):
        return False

    def set_audio_backend(backend: Optional[str]) -> None:
        """No-op (torchaudio >= 2.9 has no backends; the compat load uses soundfile)."""

    def get_audio_backend() -> str:
        return "soundfile"

    set_attr(torchaudio, "set_audio_backend", mark(set_audio_backend))
    set_attr(torchaudio, "get_audio_backend", mark(get_audio_backend))
    if not hasattr(torchaudio, "list_audio_backends"):
        set_attr(torchaudio, "list_audio_backends", mark(lambda: ["soundfile"]))
    return True
