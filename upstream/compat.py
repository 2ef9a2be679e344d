"""Compatibility shims that let s3prl 0.4.18 run on torchaudio 2.11, torch 2.14 and
huggingface_hub >= 1.0 (2.4 tested), without editing s3prl's installed files.

Call :func:`install_shims` once, before importing anything from s3prl. It is idempotent
(a second call changes nothing) and installs only what is missing: a shim is skipped where
the real thing exists (e.g. when ``tensorboardX`` or ``torchcodec`` is installed).

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

import argparse
import importlib.util
import json
import math
import os
import sys
import types
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

#: Marker attribute set on every object this module installs.
MARK = "_mam_clap_shim"

_INSTALLED: Dict[str, bool] = {}


def _mark(obj):
    setattr(obj, MARK, True)
    return obj


def _stand_in_module(name: str, doc: str) -> types.ModuleType:
    """A marked module object with a spec (so ``importlib.util.find_spec(name)`` works)."""
    import importlib.machinery

    mod = types.ModuleType(name, doc)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return _mark(mod)


# --------------------------------------------------------------------------- torchaudio


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

    torchaudio.set_audio_backend = _mark(set_audio_backend)
    torchaudio.get_audio_backend = _mark(get_audio_backend)
    if not hasattr(torchaudio, "list_audio_backends"):
        torchaudio.list_audio_backends = _mark(lambda: ["soundfile"])
    return True


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
    torchaudio.load = _mark(soundfile_load)
    torchaudio.save = _mark(soundfile_save)
    return True


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


def soundfile_info(uri, format: Optional[str] = None, buffer_size: int = 4096, backend: Optional[str] = None) -> AudioMetaData:
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
    torchaudio.info = _mark(soundfile_info)
    return True


def _seconds_to_samples(value: str, rate: int) -> int:
    """SoX time spec: seconds (``1.5``), samples (``800s``) or ``[[hh:]mm:]ss``."""
    value = str(value)
    if value.endswith("s") and value[:-1].isdigit():
        return int(value[:-1])
    secs = 0.0
    for part in value.split(":"):
        secs = secs * 60 + float(part)
    return int(round(secs * rate))


def apply_effects_tensor(
    tensor: torch.Tensor, sample_rate: int, effects: Sequence[Sequence[str]], channels_first: bool = True
) -> Tuple[torch.Tensor, int]:
    """The SoX effects s3prl uses, in torch. Returns ((channels, frames) float32, rate).

    Supported: ``channels N`` (1 = average; N > C repeats), ``rate R``, ``gain dB`` (also
    ``gain -n [dB]``: normalise the peak to dB), ``norm [dB]``, ``pad BEFORE [AFTER]``,
    ``trim START [LENGTH]``, ``reverse``. Anything else raises ``NotImplementedError``.
    """
    import torchaudio

    wav = tensor if channels_first else tensor.t()
    wav = wav.float()
    rate = int(sample_rate)
    for effect in effects:
        name, args = effect[0], list(effect[1:])
        if name == "channels":
            n = int(args[0])
            if n == 1:
                wav = wav.mean(dim=0, keepdim=True)
            elif n != wav.shape[0]:
                wav = wav.mean(dim=0, keepdim=True).expand(n, -1).clone()
        elif name == "rate":
            new = int(float(args[0].rstrip("k")) * (1000 if args[0].endswith("k") else 1))
            if new != rate:
                wav = torchaudio.functional.resample(wav, rate, new)
                rate = new
        elif name in ("gain", "norm"):
            if name == "norm" or (args and args[0] == "-n"):
                rest = args[1:] if name == "gain" else args
                level = float(rest[0]) if rest else 0.0
                peak = wav.abs().max()
                if peak > 0:
                    wav = wav * (10 ** (level / 20) / peak)
            else:
                wav = wav * 10 ** (float(args[0]) / 20)
        elif name == "pad":
            before = _seconds_to_samples(args[0], rate) if args else 0
            after = _seconds_to_samples(args[1], rate) if len(args) > 1 else 0
            wav = torch.nn.functional.pad(wav, (before, after))
        elif name == "trim":
            start = _seconds_to_samples(args[0], rate)
            end = start + _seconds_to_samples(args[1], rate) if len(args) > 1 else wav.shape[1]
            wav = wav[:, start:end]
        elif name == "reverse":
            wav = wav.flip(1)
        else:
            raise NotImplementedError(
                f"sox effect {name!r} is not implemented by upstream.compat's torchaudio.sox_effects "
                "stand-in (supported: channels, rate, gain, norm, pad, trim, reverse)"
            )
    if not channels_first:
        wav = wav.t()
    return wav.contiguous(), rate


def apply_effects_file(
    path, effects: Sequence[Sequence[str]], normalize: bool = True, channels_first: bool = True, format: Optional[str] = None
) -> Tuple[torch.Tensor, int]:
    """Load ``path`` with :func:`soundfile_load`, then :func:`apply_effects_tensor`."""
    wav, rate = soundfile_load(path, normalize=True, channels_first=True)
    return apply_effects_tensor(wav, rate, effects, channels_first=channels_first)


def shim_sox_effects() -> bool:
    """Provide ``torchaudio.sox_effects`` (``apply_effects_tensor``, ``apply_effects_file``).

    Prevents ``ModuleNotFoundError: No module named 'torchaudio.sox_effects'`` raised by
    ``from torchaudio.sox_effects import apply_effects_file`` in
    ``s3prl/downstream/speech_commands/dataset.py`` (SUPERB KS), whose loader applies
    ``[["channels", "1"], ["rate", "16000"], ["gain", "-3.0"]]``.
    """
    import torchaudio

    try:
        import torchaudio.sox_effects  # noqa: F401

        return False
    except ImportError:
        pass
    mod = _stand_in_module("torchaudio.sox_effects",
                           "torch/soundfile stand-in for the removed torchaudio.sox_effects (see upstream.compat).")
    mod.apply_effects_tensor = apply_effects_tensor
    mod.apply_effects_file = apply_effects_file
    mod.effect_names = lambda: ["channels", "rate", "gain", "norm", "pad", "trim", "reverse"]
    sys.modules["torchaudio.sox_effects"] = mod
    torchaudio.sox_effects = mod
    return True


# --------------------------------------------------------------------------- huggingface_hub


class HfFolder:
    """The removed ``huggingface_hub.HfFolder`` token helper, on the current token API."""

    @staticmethod
    def get_token() -> Optional[str]:
        import huggingface_hub

        return huggingface_hub.get_token()

    @staticmethod
    def save_token(token: str) -> None:
        from huggingface_hub import constants

        os.makedirs(os.path.dirname(constants.HF_TOKEN_PATH), exist_ok=True)
        with open(constants.HF_TOKEN_PATH, "w") as f:
            f.write(token)

    @staticmethod
    def delete_token() -> None:
        from huggingface_hub import constants

        try:
            os.remove(constants.HF_TOKEN_PATH)
        except FileNotFoundError:
            pass


class Repository:
    """Stand-in for the git-based ``huggingface_hub.Repository`` (removed in 1.0).

    s3prl uses it only to push a fine-tuned model (``--hub huggingface``); constructing it
    raises a RuntimeError that says so.
    """

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "huggingface_hub.Repository was removed in huggingface_hub 1.0; s3prl's "
            "push-to-hub (--hub huggingface) is not supported here (upstream.compat)"
        )


def shim_huggingface_hub() -> bool:
    """Add ``huggingface_hub.HfFolder`` and ``huggingface_hub.Repository``.

    Prevents ``ImportError: cannot import name 'HfFolder' from 'huggingface_hub'`` (then the
    same for ``'Repository'``) at ``from huggingface_hub import HfApi, HfFolder, Repository``
    in ``s3prl/downstream/runner.py`` and ``s3prl/run_downstream.py``.
    """
    import huggingface_hub

    changed = False
    for name, obj in (("HfFolder", HfFolder), ("Repository", Repository)):
        if not hasattr(huggingface_hub, name):
            setattr(huggingface_hub, name, _mark(obj))
            changed = True
    return changed


# --------------------------------------------------------------------------- tensorboardX


class JsonlSummaryWriter:
    """Minimal ``SummaryWriter``: scalars go to ``<logdir>/scalars.jsonl`` as JSON lines
    ``{"tag": ..., "value": ..., "step": ...}``; every other ``add_*`` call is ignored."""

    def __init__(self, logdir: Optional[str] = None, *args, **kwargs):
        logdir = logdir or kwargs.get("log_dir") or "runs"
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self.path = os.path.join(logdir, "scalars.jsonl")

    def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs) -> None:
        value = float(scalar_value.item() if hasattr(scalar_value, "item") else scalar_value)
        with open(self.path, "a") as f:
            f.write(json.dumps({"tag": tag, "value": value if math.isfinite(value) else str(value),
                                "step": None if global_step is None else int(global_step)}) + "\n")

    def add_scalars(self, main_tag, tag_scalar_dict, global_step=None, *args, **kwargs) -> None:
        for tag, value in tag_scalar_dict.items():
            self.add_scalar(f"{main_tag}/{tag}", value, global_step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __getattr__(self, name: str):
        if name.startswith("add_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _torch_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        return None


def shim_tensorboardx() -> bool:
    """Provide a ``tensorboardX`` module whose ``SummaryWriter`` is torch's (if the
    ``tensorboard`` package is installed) or :class:`JsonlSummaryWriter`.

    Prevents ``ModuleNotFoundError: No module named 'tensorboardX'`` at
    ``from tensorboardX import SummaryWriter`` in ``s3prl/downstream/runner.py``.
    """
    if "tensorboardX" in sys.modules or importlib.util.find_spec("tensorboardX") is not None:
        return False
    mod = _stand_in_module("tensorboardX", "Stand-in for tensorboardX (see upstream.compat.shim_tensorboardx).")
    mod.SummaryWriter = _torch_summary_writer() or JsonlSummaryWriter
    sys.modules["tensorboardX"] = mod
    return True


# --------------------------------------------------------------------------- catalyst


class DistributedSamplerWrapper(torch.utils.data.Sampler):
    """This rank's share of another sampler's indices (re-implements catalyst's wrapper).

    Each ``iter`` draws the wrapped sampler once (e.g. a ``WeightedRandomSampler``), then
    takes the positions a ``DistributedSampler`` over that draw assigns to this rank.
    """

    def __init__(self, sampler, num_replicas: Optional[int] = None, rank: Optional[int] = None, shuffle: bool = True):
        import torch.distributed as dist

        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.sampler = sampler
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.epoch = 0

    def _distributed_positions(self, n: int) -> List[int]:
        ds = torch.utils.data.DistributedSampler(
            range(n), num_replicas=self.num_replicas, rank=self.rank, shuffle=self.shuffle
        )
        ds.set_epoch(self.epoch)
        return list(iter(ds))

    def __iter__(self):
        drawn = list(iter(self.sampler))
        return iter([drawn[i] for i in self._distributed_positions(len(drawn))])

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def shim_catalyst() -> bool:
    """Provide ``catalyst.data.sampler.DistributedSamplerWrapper``.

    Prevents ``ModuleNotFoundError: No module named 'catalyst'`` at
    ``from catalyst.data.sampler import DistributedSamplerWrapper`` in
    ``s3prl/downstream/speech_commands/expert.py`` (the wrapper is used only when
    torch.distributed is initialised).
    """
    if "catalyst" in sys.modules or importlib.util.find_spec("catalyst") is not None:
        return False
    doc = "Stand-in for catalyst (see upstream.compat.shim_catalyst)."
    root, data, sampler = (_stand_in_module(n, doc) for n in ("catalyst", "catalyst.data", "catalyst.data.sampler"))
    root.__path__, data.__path__ = [], []  # packages, so the submodule imports resolve
    sampler.DistributedSamplerWrapper = DistributedSamplerWrapper
    root.data, data.sampler = data, sampler
    for mod in (root, data, sampler):
        sys.modules[mod.__name__] = mod
    return True


# --------------------------------------------------------------------------- torch.load


def shim_torch_load_namespace() -> bool:
    """Allow ``argparse.Namespace`` in ``torch.load(..., weights_only=True)``.

    Prevents ``_pickle.UnpicklingError: Weights only load failed. ... WeightsUnpickler
    error: Unsupported global: GLOBAL argparse.Namespace was not an allowed global by
    default.`` when ``s3prl.run_downstream`` resumes or evaluates (``-m evaluate -e
    dev-best.ckpt``): the runner saves ``all_states['Args']`` (an ``argparse.Namespace``)
    and reloads it with a plain ``torch.load``, whose default became ``weights_only=True``
    in torch 2.6. Deliberately narrow: the weights-only loader stays on; only Namespace is
    added to its allow-list.
    """
    safe = getattr(torch.serialization, "get_safe_globals", lambda: [])()
    if argparse.Namespace in safe:
        return False
    torch.serialization.add_safe_globals([argparse.Namespace])
    return True


# --------------------------------------------------------------------------- entry point

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
    """Names of the shims :func:`install_shims` has processed in this process."""
    return [name for name in SHIMS if _INSTALLED.get(name)]
