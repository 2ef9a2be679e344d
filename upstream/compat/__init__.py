"""Compatibility shims that let s3prl 0.4.18 run on torchaudio 2.11, torch 2.14 and
huggingface_hub >= 1.0 (2.4 tested), without editing s3prl's installed files.

Call :func:`install_shims` once, before importing anything from s3prl. It is idempotent
(a second call changes nothing) and installs only what is missing: a shim is skipped where
the real thing exists (e.g. when ``tensorboardX`` or ``torchcodec`` is installed).
Every change is recorded: :func:`uninstall_shims` undoes them all, and
``with shims_installed(): ...`` installs the shims for a block only (and unloads the s3prl
modules imported inside it, which were built on the shims).

One module per shim: ``set_audio_backend``, ``sox_effects``, ``load``, ``info``, ``hf_hub``,
``tensorboardx_writer``, ``catalyst_sampler``, ``torch_load_namespace`` (``_patch`` holds
the marker and the undo journal they share).

======================================  ==========================================================
shim                                    error it prevents
======================================  ==========================================================
``shim_set_audio_backend``              ``AttributeError: module 'torchaudio' has no attribute
                                        'set_audio_backend'`` on ``import s3prl.hub`` (byol_s) and
                                        in ``run_downstream.main``
``shim_sox_effects``                    ``ModuleNotFoundError: No module named
                                        'torchaudio.sox_effects'`` on importing the speech_commands
                                        downstream (``apply_effects_file``)
``shim_load``                           ``ImportError: TorchCodec is required for
                                        load_with_torchcodec. Please install torchcodec to use this
                                        function.`` from ``torchaudio.load`` / ``torchaudio.save``
``shim_info``                           ``AttributeError: module 'torchaudio' has no attribute
                                        'info'`` (s3prl.problem, s3prl.util.audio_info)
``shim_huggingface_hub``                ``ImportError: cannot import name 'HfFolder' from
                                        'huggingface_hub'`` (and ``'Repository'``) on importing
                                        ``s3prl.downstream.runner``
``shim_tensorboardx``                   ``ModuleNotFoundError: No module named 'tensorboardX'`` on
                                        importing ``s3prl.downstream.runner``
``shim_catalyst``                       ``ModuleNotFoundError: No module named 'catalyst'`` on
                                        importing the speech_commands downstream expert
``shim_torch_load_namespace``           ``_pickle.UnpicklingError: Weights only load failed ...
                                        Unsupported global: GLOBAL argparse.Namespace ...`` when
                                        ``run_downstream -m evaluate -e dev-best.ckpt`` reloads the
                                        runner's checkpoint (it stores ``Args`` as a Namespace)
======================================  ==========================================================

Scope and limits (documented, deliberate):

* The soundfile-based ``torchaudio.load``/``save``/``info`` read and write what libsndfile
  does (WAV, FLAC, OGG, ...); no MP3/M4A decoding without torchcodec.
* ``torchaudio.sox_effects`` implements the effects s3prl's downstreams in this project use
  (``channels``, ``rate``, ``gain``, ``norm``, ``pad``, ``trim``, ``reverse``); any other
  effect (``silence``, ``vad``, ...) raises ``NotImplementedError`` naming it. ``rate`` uses
  ``torchaudio.functional.resample`` (windowed sinc), not SoX's resampler, so resampled audio
  differs from SoX's by a small filter difference; ``channels 1`` averages the channels as
  SoX does.
* ``huggingface_hub.HfFolder`` maps to the current token functions; ``Repository`` (the
  git-based API removed in huggingface_hub 1.0) is a stand-in that raises a clear
  ``RuntimeError`` when used, i.e. only for s3prl's ``--hub huggingface`` push, which this
  project does not use.
* ``tensorboardX.SummaryWriter``: if ``torch.utils.tensorboard`` works (the ``tensorboard``
  package is installed) it is used; otherwise a small writer that appends each scalar as a
  JSON line ``{"tag", "value", "step"}`` to ``<logdir>/scalars.jsonl`` and ignores every
  other kind of summary (text, histograms, figures, audio).
* ``catalyst.data.sampler.DistributedSamplerWrapper`` is a small re-implementation: each
  epoch it draws the wrapped sampler's indices and gives this rank its share, as catalyst's
  does (used only under torch.distributed).
* ``torch.load`` keeps its ``weights_only=True`` default; only ``argparse.Namespace`` is
  added to the weights-only allow-list (``torch.serialization.add_safe_globals``). A
  Namespace is a plain attribute bag (its unpickling runs no code beyond setting
  attributes), so this widens the safe loader minimally instead of switching to
  ``weights_only=False`` for every file.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Dict, Iterator, List

from ._patch import MARK, journal_length, undo_to
from .catalyst_sampler import DistributedSamplerWrapper, shim_catalyst
from .hf_hub import HfFolder, Repository, shim_huggingface_hub
from .info import AudioMetaData, shim_info, soundfile_info
from .load import shim_load, soundfile_load, soundfile_save
from .set_audio_backend import shim_set_audio_backend
from .sox_effects import apply_effects_file, apply_effects_tensor, shim_sox_effects
from .tensorboardx_writer import JsonlSummaryWriter, shim_tensorboardx
from .torch_load_namespace import shim_torch_load_namespace

__all__ = [
    "MARK", "SHIMS", "install_shims", "installed_shims", "shims_installed", "uninstall_shims",
    "AudioMetaData", "DistributedSamplerWrapper", "HfFolder", "JsonlSummaryWriter", "Repository",
    "apply_effects_file", "apply_effects_tensor", "soundfile_info", "soundfile_load", "soundfile_save",
]

#: Every shim, in installation order.
SHIMS: Dict[str, Callable[[], bool]] = {
    "set_audio_backend": shim_set_audio_backend,
    "sox_effects": shim_sox_effects,
    "load": shim_load,
    "info": shim_info,
    "huggingface_hub": shim_huggingface_hub,
    "tensorboardx": shim_tensorboardx,
    "catalyst": shim_catalyst,
    "torch_load_namespace": shim_torch_load_namespace,
}

_INSTALLED: Dict[str, bool] = {}


def install_shims() -> List[str]:
    """Install every shim s3prl 0.4.18 needs here; idempotent.

    Returns the names of the shims this call installed (empty on a second call, or where
    nothing was missing). Call it before importing ``s3prl``.
    """
    installed = []
    for name, shim in SHIMS.items():
        if shim():
            installed.append(name)
        _INSTALLED[name] = True
    return installed


def installed_shims() -> List[str]:
    """Names of the shims :func:`install_shims` has processed in this process (since the last
    :func:`uninstall_shims`)."""
    return [name for name in SHIMS if _INSTALLED.get(name)]


def uninstall_shims() -> None:
    """Undo every change the shims made: attributes of torchaudio / huggingface_hub restored
    or removed, stand-in modules taken out of ``sys.modules``, ``argparse.Namespace`` off torch's
    weights-only allow-list. Modules imported meanwhile that hold a shim (e.g. s3prl's) keep it."""
    undo_to(0)
    _INSTALLED.clear()


@contextlib.contextmanager
def shims_installed(unload: tuple = ("s3prl",)) -> Iterator[List[str]]:
    """Install the shims for the ``with`` block only; yields the names installed.

    On exit, undoes the changes made inside the block (not those of an earlier
    :func:`install_shims`) and removes from ``sys.modules`` the modules of the packages named
    in ``unload`` that were imported inside the block: they were built on the shims.
    """
    start, before, processed = journal_length(), set(sys.modules), dict(_INSTALLED)
    try:
        yield install_shims()
    finally:
        undo_to(start)
        _INSTALLED.clear()
        _INSTALLED.update(processed)
        for name in [n for n in sys.modules if n not in before and n.split(".")[0] in unload]:
            del sys.modules[name]
