"""AudioMAE checkpoints into this project's :class:`AudioEncoder` (an encoder export).

Facts used (key names and shapes of AudioMAE's released files; none of its code):

* **Input files.** AudioMAE's released ``{'model': state_dict, ...}`` files (a pretraining
  file also holds ``optimizer``, ``epoch``, ``scaler``, ``args`` -- an
  ``argparse.Namespace``, which is allowed in weights-only loading: it rebuilds a plain
  attribute bag and runs no code), and the same weights in timm's layout: the bare state
  dict, as a torch file (optionally under ``state_dict``) or as ``.safetensors``. A
  ``module.`` prefix (DDP) is removed.
* **Encoder keys** (ViT-B: D = 768, 12 blocks, 12 heads; 1024 x 128 fbank -> 64 x 8 patches):
  ``cls_token`` (1, 1, D); ``pos_embed`` (1, 513, D); ``patch_embed.proj.weight``
  (D, 1, 16, 16) and ``.bias``; ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}
  .{weight,bias}``; ``norm.{weight,bias}``.
* **Fine-tuned files** have no ``norm.*`` (the tokens are mean-pooled first) but
  ``fc_norm.{weight,bias}`` (D,) and ``head.{weight,bias}`` (527 classes for AudioSet).
  The converted encoder then ends without a LayerNorm (``final_norm=False``) and the
  export keeps the four head tensors under the same names (``config["head"]``).
* **Decoder keys** of a pretraining file (``mask_token`` and ``decoder_*``) are dropped and
  listed in the report (and in the export's ``source.dropped``).
* **Position table.** ``pos_embed`` is kept as stored: AudioMAE built its sin-cos table on
  an (8, 64) grid while its tokens are time-major (token ``t * 8 + f``), so recomputing it
  would change the model. :class:`AudioEncoder` keeps the table as a buffer; an input of
  ``t`` time patches uses its first ``t * 8`` rows after the cls row.

The mapping is strict: every encoder key of :class:`AudioEncoder` must come from the file
with the right shape; otherwise :class:`ConversionError` lists the missing, unexpected and
mis-shaped keys (in the file's names).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, NamedTuple, Optional

import torch

from .checkpoint import infer_encoder_config, save_encoder
from .data.audio import resolve_norm_stats
from .files import CheckpointError, file_sha256, is_safetensors, read_safetensors, read_torch_file
from .modules.encoder import AudioEncoder

#: Head tensors of a fine-tuned file (kept in the export under these names).
HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
#: Width of one attention head in AudioMAE's ViTs (768 / 12); the default head count is D / 64.
HEAD_DIM = 64


class ConversionError(CheckpointError):
    """An AudioMAE or timm file that does not map onto the encoder; names the file."""


class Conversion(NamedTuple):
    """Result of :func:`convert_state_dict`.

    encoder: the loaded :class:`AudioEncoder` (eval mode); config: its constructor
    arguments; head: ``{name: tensor}`` of a fine-tuned file (or None); dropped: decoder
    keys left out; kind: ``"pretraining"`` or ``"finetuning"``.
    """

    encoder: AudioEncoder
    config: Dict[str, Any]
    head: Optional[Dict[str, torch.Tensor]]
    dropped: List[str]
    kind: str


def _to_encoder_name(key: str) -> str:
    """AudioMAE/timm name -> :class:`AudioEncoder` name (only the patch conv differs)."""
    return "patch_embed." + key[len("patch_embed.proj."):] if key.startswith("patch_embed.proj.") else key


def _to_source_name(key: str) -> str:
    return "patch_embed.proj." + key[len("patch_embed."):] if key.startswith("patch_embed.") else key


def _is_decoder(key: str) -> bool:
    return key == "mask_token" or key.startswith("decoder_")


def read_state_dict(path: str, trusted: bool = False) -> Dict[str, torch.Tensor]:
    """The weights of an AudioMAE file (``{'model': ...}``) or of a timm-layout file (bare
    state dict, torch or safetensors), without a ``module.`` prefix."""
    if os.path.isfile(path) and is_safetensors(path):
        state, _ = read_safetensors(path, error=ConversionError)
    else:
        state = read_torch_file(path, trusted, safe_globals=(argparse.Namespace,), error=ConversionError,
                                trust_hint="--trusted")
        if isinstance(state, dict):
            for wrapper in ("model", "state_dict"):
                if isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
                    break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:8] if isinstance(state, dict) else ""
        raise ConversionError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}}), "
                              f"got {type(state).__name__} with keys {keys}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def convert_state_dict(state: Dict[str, torch.Tensor], path: str = "<state dict>",
                       num_heads: Optional[int] = None) -> Conversion:
    """Map an AudioMAE/timm ViT state dict onto :class:`AudioEncoder` (strict).

    ``num_heads`` defaults to D / 64 (12 for ViT-B: the head count is not in the shapes).
    """
    dropped = sorted(k for k in state if _is_decoder(k))
    present = [k for k in HEAD_KEYS if k in state]
    if present and len(present) < len(HEAD_KEYS):
        raise ConversionError(f"{path}: a fine-tuned head needs {list(HEAD_KEYS)}; missing "
                              f"{[k for k in HEAD_KEYS if k not in state]}")
    head = {k: state[k].float().contiguous() for k in present} or None
    weights = {_to_encoder_name(k): v.float() for k, v in state.items() if not _is_decoder(k) and k not in HEAD_KEYS}
    if "cls_token" not in weights:
        raise ConversionError(f"{path}: no cls_token; not an AudioMAE/ViT encoder (keys {sorted(state)[:8]} ...)")
    dim = int(weights["cls_token"].shape[-1])
    config = infer_encoder_config(weights, num_heads or max(1, dim // HEAD_DIM), path)
    if head is None:
        config["final_norm"] = True  # a pretraining encoder ends with norm.*: missing if absent
    encoder = AudioEncoder(**config)
    expected = encoder.state_dict()
    missing = sorted(_to_source_name(k) for k in expected if k not in weights)
    unexpected = sorted(_to_source_name(k) for k in weights if k not in expected)
    shapes = [f"{_to_source_name(k)} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
              for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ConversionError(f"{path}: does not map onto the encoder ({config}): missing keys {missing}, "
                              f"unexpected keys {unexpected}, wrong shapes {shapes}")
    if head is not None:
        classes = head["head.weight"].shape[0]
        want = {"fc_norm.weight": (dim,), "fc_norm.bias": (dim,), "head.weight": (classes, dim),
                "head.bias": (classes,)}
        bad = [f"{k} {tuple(v.shape)} (expected {want[k]})" for k, v in head.items() if tuple(v.shape) != want[k]]
        if bad:
            raise ConversionError(f"{path}: head tensors of the wrong shape: {bad}")
    encoder.load_state_dict(weights, strict=True)
    return Conversion(encoder.eval(), config, head, dropped, "finetuning" if head else "pretraining")


def convert_audiomae(in_path: str, out_path: str, norm_stats: str = "audioset", num_heads: Optional[int] = None,
                     trusted: bool = False) -> Dict[str, Any]:
    """Convert ``in_path`` into an encoder export at ``out_path`` (``.safetensors`` keeps a
    fine-tuned head; ``.pt`` writes the torch export of an encoder without head).

    ``norm_stats``: the fbank stats the weights were trained with (``audioset`` for
    AudioMAE's AudioSet models; a name of ``NORM_STATS`` or ``'mean,std'``). The target
    length recorded is the file's grid (``max_frames``). Returns the export's metadata plus
    ``dropped`` (the decoder keys left out) and ``kind``; ``encoder`` (the architecture) and
    ``head`` (None for a ``.pt``) are there for both output forms.
    """
    conv = convert_state_dict(read_state_dict(in_path, trusted), in_path, num_heads)
    try:
        mean, std = resolve_norm_stats(norm_stats)
    except ValueError as err:
        raise ConversionError(f"--norm-stats: {err}") from None
    head = None
    if conv.head is not None:
        head = {"config": {"num_classes": int(conv.head["head.weight"].shape[0]), "pooling": "mean",
                           "fc_norm": True, "source": "audiomae"},
                "weights": conv.head}
    meta = save_encoder(out_path, conv.encoder, conv.config, mean, std, norm_stats, conv.config["max_frames"],
                        os.path.basename(in_path), source_sha256=file_sha256(in_path),
                        source_kind=f"audiomae:{conv.kind}", source_extra={"dropped": conv.dropped}, head=head)
    # the torch export (.pt) records its architecture as encoder_config and has no head:
    # report both forms with the same "encoder" and "head" entries
    return {**meta, "encoder": meta.get("encoder", dict(conv.config)), "head": meta.get("head"),
            "dropped": conv.dropped, "kind": conv.kind}
