"""s3prl hub entries for this plugin's encoder (s3prl's ``upstream/example/hubconf.py``
layout): every public callable here is an upstream entry.

s3prl collects entries from its own ``s3prl/upstream/*/hubconf.py`` only, so register
this one into ``s3prl.hub`` before use (after :func:`upstream.compat.install_shims`); the
``upstream`` package is installed with this project, so this works from any directory::

    from upstream.hubconf import register
    register()                      # setattr(s3prl.hub, "supmam_clap_local", ...)
    S3PRLUpstream("supmam_clap_local", path_or_url="checkpoint_last.pt")
"""
from __future__ import annotations

import os
from typing import List

from .expert import UpstreamExpert as _UpstreamExpert


def supmam_clap_local(ckpt: str, *args, **kwargs) -> _UpstreamExpert:
    """The pretrained encoder of a local checkpoint (a pretraining checkpoint of this plugin,
    an encoder export or a Hugging Face folder) as an s3prl upstream.

    Args:
        ckpt: path of the file or Hugging Face folder (s3prl's ``-k``).
        model_config: optional YAML/JSON file of expert options (s3prl's ``-g``).
        kwargs: expert options (``freq_pool``, ``window_frames``, ...); see
            :class:`upstream.expert.UpstreamExpert`.

    Raises:
        FileNotFoundError: ``ckpt`` is not an existing file or folder (also under ``python -O``).
    """
    if not isinstance(ckpt, (str, os.PathLike)) or not os.path.exists(ckpt):
        raise FileNotFoundError(f"supmam_clap_local: checkpoint not found: {ckpt!r} (pass a pretraining checkpoint, "
                                "an encoder export or a Hugging Face folder of this plugin, s3prl's -k)")
    return _UpstreamExpert(os.fspath(ckpt), *args, **kwargs)


#: The entries this module defines (what :func:`register` adds to ``s3prl.hub``).
ENTRIES = {"supmam_clap_local": supmam_clap_local}


def register(hub=None) -> List[str]:
    """Install the compat shims, import ``s3prl.hub`` (unless given) and add the entries to it
    by ``setattr``. Idempotent; returns the entry names."""
    if hub is None:
        from .compat import install_shims

        install_shims()
        from s3prl import hub
    for name, entry in ENTRIES.items():
        setattr(hub, name, entry)
    return list(ENTRIES)
