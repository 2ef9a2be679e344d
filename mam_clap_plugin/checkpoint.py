"""Loading this plugin's checkpoints on torch >= 2.6, where ``torch.load`` defaults to
``weights_only=True``.

The choice is deliberate: checkpoints written by this plugin's fairseq runs hold only
tensors and plain containers (fairseq stores the config as a dict), so they load with
``weights_only=True`` and no code from the file is ever executed. A file that needs
more (an older fairseq checkpoint whose ``args`` is an ``argparse.Namespace``, say)
is refused with a clear error; pass ``trusted=True`` only for files you trust, which
loads them with ``weights_only=False``.

Encoder-only export: :func:`export_encoder` writes a small file holding the encoder's
constructor arguments, its weights and the fbank normalisation stats of its pretraining
(plain dicts, floats and tensors, so it also loads with ``weights_only=True``).
:func:`load_encoder` and :func:`load_encoder_with_stats` accept both kinds of file.

Nothing here imports fairseq, so the encoder loads without it.
"""
from __future__ import annotations

import os
import pickle
import struct
from typing import Any, Dict, NamedTuple, Optional

import torch

from .data.audio import resolve_norm_stats
from .modules.encoder import AudioEncoder

#: ``format`` entry of an encoder-only export; ``version`` is EXPORT_VERSION.
EXPORT_FORMAT = "mam_clap_encoder"
EXPORT_VERSION = 1
#: Default of the pretraining task's ``norm_stats`` (used when a checkpoint lacks it).
DEFAULT_NORM_STATS = "audioset"


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


def load_checkpoint(path: str, trusted: bool = False) -> Dict[str, Any]:
    """Read a checkpoint onto the CPU (``weights_only=True`` unless ``trusted``)."""
    state = read_torch_file(path, trusted)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: no 'model' entry; not a fairseq or exported checkpoint")
    return state


def model_config(state: Dict[str, Any], path: str = "<checkpoint>") -> Dict[str, Any]:
    """The ``supmam_clap`` model config stored in a checkpoint, as a dict."""
    cfg = state.get("cfg") or {}
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not model_cfg or model_cfg.get("_name") != "supmam_clap":
        name = model_cfg.get("_name") if model_cfg else None
        raise CheckpointError(f"{path}: model is {name!r}, expected a 'supmam_clap' checkpoint")
    return dict(model_cfg)


def is_exported(state: Dict[str, Any]) -> bool:
    """True for a file written by :func:`export_encoder`."""
    return state.get("format") == EXPORT_FORMAT


def encoder_config(state: Dict[str, Any], path: str = "<checkpoint>") -> Dict[str, Any]:
    """:class:`AudioEncoder` constructor arguments of a pretraining checkpoint or an export."""
    if is_exported(state):
        version = state.get("version")
        if version != EXPORT_VERSION:
            raise CheckpointError(f"{path}: encoder export version {version!r}; this code reads version {EXPORT_VERSION}")
        return dict(state["encoder_config"])
    cfg = model_config(state, path)
    return {
        "embed_dim": cfg["encoder_embed_dim"],
        "depth": cfg["encoder_layers"],
        "num_heads": cfg["encoder_attention_heads"],
        "mlp_ratio": cfg["mlp_ratio"],
        "max_frames": cfg["max_frames"],
    }


def _encoder_weights(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    if is_exported(state):
        return dict(state["model"])
    prefix = "encoder."
    return {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}


def _build_encoder(state: Dict[str, Any], path: str) -> AudioEncoder:
    encoder = AudioEncoder(**encoder_config(state, path))
    missing, unexpected = encoder.load_state_dict(_encoder_weights(state), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: encoder weights do not match the config: missing {missing}, unexpected {unexpected}")
    return encoder.eval()


def _task_config(state: Dict[str, Any]) -> Dict[str, Any]:
    cfg = state.get("cfg") or {}
    task = cfg.get("task") if isinstance(cfg, dict) else None
    return dict(task) if task else {}


def _norm_spec(state: Dict[str, Any]) -> str:
    """A pretraining checkpoint's ``task.norm_stats`` (name or 'mean,std'), default audioset."""
    return str(_task_config(state).get("norm_stats") or DEFAULT_NORM_STATS)


def norm_stats(state: Dict[str, Any], path: str = "<checkpoint>") -> tuple[float, float]:
    """(mean, std) of the fbank normalisation the encoder was pretrained with.

    Exports store them; pretraining checkpoints store ``cfg.task.norm_stats`` (a name from
    ``NORM_STATS`` or ``'mean,std'``), or the task default ``audioset`` when absent.
    """
    if is_exported(state):
        stats = state["norm_stats"]
        return float(stats["mean"]), float(stats["std"])
    try:
        return resolve_norm_stats(_norm_spec(state))
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err


class EncoderBundle(NamedTuple):
    """What an upstream needs from a checkpoint: the encoder (eval mode), the fbank
    normalisation ``(fbank - norm_mean) / (2 * norm_std)``, and the clip length in frames
    the encoder was pretrained on (``task.target_length``; None if unknown)."""

    encoder: AudioEncoder
    norm_mean: float
    norm_std: float
    target_length: Optional[int]


def load_encoder(path: str, trusted: bool = False) -> AudioEncoder:
    """The pretrained :class:`AudioEncoder` of a pretraining checkpoint or an encoder export,
    in eval mode (strict load)."""
    state = load_checkpoint(path, trusted)
    return _build_encoder(state, path)


def load_encoder_with_stats(path: str, trusted: bool = False) -> EncoderBundle:
    """:func:`load_encoder` plus the normalisation stats and pretraining clip length."""
    return _bundle(load_checkpoint(path, trusted), path)


def _bundle(state: Dict[str, Any], path: str) -> EncoderBundle:
    encoder = _build_encoder(state, path)
    mean, std = norm_stats(state, path)
    if is_exported(state):
        target_length = state.get("target_length")
    else:
        target_length = _task_config(state).get("target_length")
    return EncoderBundle(encoder, mean, std, None if target_length is None else int(target_length))


def export_encoder(checkpoint_path: str, out_path: str, trusted: bool = False) -> Dict[str, Any]:
    """Write the encoder of a pretraining checkpoint (or of an export) as an encoder-only file.

    The file is a dict of plain values and tensors (loads with ``weights_only=True``, no
    fairseq needed)::

        {"format": "mam_clap_encoder", "version": 1,
         "encoder_config": {AudioEncoder kwargs: embed_dim, depth, num_heads, mlp_ratio,
                            max_frames, num_mel_bins},
         "model": {encoder state dict, no "encoder." prefix},
         "norm_stats": {"mean": float, "std": float, "spec": str},
         "target_length": int or None, "source": str (basename of the checkpoint)}

    Returns the written dict's metadata (everything except the weights).
    """
    state = load_checkpoint(checkpoint_path, trusted)
    bundle = _bundle(state, checkpoint_path)
    enc = bundle.encoder
    config = encoder_config(state, checkpoint_path)
    config.setdefault("num_mel_bins", enc.num_mel_bins)
    if is_exported(state):
        spec = state["norm_stats"].get("spec", f"{bundle.norm_mean},{bundle.norm_std}")
    else:
        spec = _norm_spec(state)
    return save_encoder(out_path, enc, config, bundle.norm_mean, bundle.norm_std, spec, bundle.target_length,
                        os.path.basename(checkpoint_path))


def save_encoder(out_path: str, encoder: AudioEncoder, config: Dict[str, Any], norm_mean: float, norm_std: float,
                 norm_spec: str, target_length: Optional[int], source: str) -> Dict[str, Any]:
    """Write ``encoder`` in the export format of :func:`export_encoder` (atomically);
    ``config`` holds its constructor arguments. Returns the metadata (all but the weights)."""
    meta = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "encoder_config": dict(config),
        "norm_stats": {"mean": norm_mean, "std": norm_std, "spec": norm_spec},
        "target_length": target_length,
        "source": source,
    }
    weights = {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp"
    torch.save({**meta, "model": weights}, tmp)
    os.replace(tmp, out_path)
    return meta
