"""Loading this plugin's checkpoints on torch >= 2.6, where ``torch.load`` defaults to
``weights_only=True``.

The choice is deliberate: checkpoints written by this plugin's fairseq runs hold only
tensors and plain containers (fairseq stores the config as a dict), so they load with
``weights_only=True`` and no code from the file is ever executed. A file that needs
more (an older fairseq checkpoint whose ``args`` is an ``argparse.Namespace``, say)
is refused with a clear error; pass ``trusted=True`` only for files you trust, which
loads them with ``weights_only=False``.

Nothing here imports fairseq, so the encoder loads without it.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict

import torch

from .modules.encoder import AudioEncoder


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not from this plugin."""


def load_checkpoint(path: str, trusted: bool = False) -> Dict[str, Any]:
    """Read a checkpoint onto the CPU (``weights_only=True`` unless ``trusted``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: holds objects that torch's weights-only loader refuses ({err}). "
            "If you trust this file, load it with trusted=True (weights_only=False)."
        ) from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err
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


def load_encoder(path: str, trusted: bool = False) -> AudioEncoder:
    """The pretrained :class:`AudioEncoder` of a checkpoint, in eval mode (strict load)."""
    state = load_checkpoint(path, trusted)
    encoder = AudioEncoder.from_model_config(model_config(state, path))
    prefix = "encoder."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: encoder weights do not match the config: missing {missing}, unexpected {unexpected}")
    return encoder.eval()
