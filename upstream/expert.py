"""s3prl upstream for this plugin's pretrained :class:`AudioEncoder` (s3prl's
``upstream/example`` layout: ``UpstreamExpert`` here, the hub entry in ``hubconf.py``).

Input: a list of 1-D 16 kHz waveforms of any length (one sample up to minutes).
Output: ``{"hidden_states": [depth + 1 tensors (B, T, H)], "last_hidden_state": (B, T, H)}``.

How a clip becomes features: the windowing of :mod:`mam_clap_plugin.features` (shared with
``examples/extract_features.py``; nothing re-implemented):

1. ``T_i = len(range(0, S_i, 2560))`` time steps for a clip of ``S_i`` samples (s3prl's
   length contract; one step = one 16-frame time patch = 16 x 160 samples = 160 ms).
2. ``clip_fbank``: the pretraining front end on the clip's own samples, ``16 * T_i`` frames,
   normalised with the checkpoint's stats.
3. ``encode_windows``: windows of ``window_frames`` (default: the encoder's ``max_frames``,
   1024 = 10.24 s), the last one keeping its own length; windows of equal length are
   encoded together, so a clip's features do not depend on the other clips in the batch or
   on the batch padding (exact up to float rounding).
4. Per layer: drop the cls token and pool the 8 frequency patches of each step -- mean
   (default, H = D) or concatenation (``freq_pool="concat"``, H = 8 * D, low to high
   frequency) -- then concatenate the windows along time and zero-pad the batch to the
   longest clip.

Frequency pooling: mean is the default. It keeps H equal to the encoder width (768 for
ViT-B, the width of other SUPERB upstreams, and what the pretraining heads and the linear
probe see per token), so the s3prl downstream's projector and the weighted sum stay 8x
smaller than with concatenation; AudioMAE-style models are evaluated on mean-pooled
tokens. ``concat`` keeps the per-band detail (as s3prl's SSAST patch upstream does) at 8x
the width.

``hidden_states`` are the patch embedding (with positions) and each block's raw output;
``last_hidden_state`` is the encoder's final LayerNorm output (what pretraining feeds its
heads), pooled the same way.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence

from mam_clap_plugin.checkpoint import load_encoder_with_stats
from mam_clap_plugin.features import (
    DOWNSAMPLE_RATE,
    check_freq_pool,
    check_window,
    clip_fbank,
    encode_windows,
    num_steps,  # noqa: F401  (part of this module's API)
)

try:  # s3prl's base class (hooks support); the expert works without s3prl installed too
    from s3prl.upstream.interfaces import UpstreamBase as _Base
except ImportError:  # pragma: no cover - s3prl is an optional dependency
    _Base = nn.Module


def _read_options(model_config: Optional[str]) -> dict:
    """Expert options from s3prl's ``-g``/``model_config``: a YAML/JSON file or None."""
    if not model_config:
        return {}
    if not os.path.isfile(model_config):
        raise FileNotFoundError(f"model_config {model_config!r} is not a file")
    import yaml

    with open(model_config) as f:
        options = yaml.safe_load(f) or {}
    if not isinstance(options, dict):
        raise ValueError(f"{model_config}: expected a mapping of expert options, got {type(options).__name__}")
    return options


class UpstreamExpert(_Base):
    """The pretrained encoder as an s3prl upstream.

    Args:
        ckpt: any file ``mam_clap_plugin.load_encoder`` reads: a pretraining or fine-tuning
            checkpoint of this plugin (fairseq layout), an encoder export
            (``examples/export_encoder.py``, safetensors or ``.pt``), a Hugging Face folder
            (``examples/export_encoder.py CKPT OUT --hub``) or a converted AudioMAE file
            (``examples/convert/audiomae_to_mam_clap.py``); torch files load with
            ``weights_only=True``.
        model_config: optional YAML/JSON file with the options below (s3prl's ``-g``);
            keyword arguments take precedence.
        freq_pool: ``"mean"`` (H = D, default) or ``"concat"`` (H = 8 * D).
        window_frames: fbank frames per encoder window (multiple of 16, at most the
            encoder's ``max_frames``; default ``max_frames``).
        max_windows_per_batch: cap on windows per encoder call (memory); default no cap.
        trusted: load the checkpoint with ``weights_only=False`` (trusted files only).
    Other keyword arguments (e.g. ``refresh`` from ``S3PRLUpstream``) are accepted and ignored.
    """

    def __init__(self, ckpt: str, model_config: Optional[str] = None, **kwargs):
        options = {**_read_options(model_config), **kwargs}
        freq_pool = options.pop("freq_pool", "mean")
        window_frames = options.pop("window_frames", None)
        max_windows = options.pop("max_windows_per_batch", None)
        trusted = bool(options.pop("trusted", False))
        hook_kwargs = {k: options[k] for k in ("hooks", "hook_postprocess") if k in options}
        super().__init__(**hook_kwargs)
        check_freq_pool(freq_pool)
        bundle = load_encoder_with_stats(ckpt, trusted=trusted)
        self.name = "[SupMAM-CLAP UpstreamExpert]"
        self.ckpt = ckpt
        self.encoder = bundle.encoder
        self.norm_mean, self.norm_std = bundle.norm_mean, bundle.norm_std
        self.freq_pool = freq_pool
        self.window_frames = check_window(self.encoder, window_frames)
        self.max_windows_per_batch = int(max_windows) if max_windows else None
        grid_freq, dim = self.encoder.grid_freq, self.encoder.embed_dim
        self.hidden_size = dim if freq_pool == "mean" else grid_freq * dim
        self.num_layers = len(self.encoder.blocks) + 1

    def get_downsample_rates(self, key: str = None) -> int:
        """Every key: one step per 16-frame time patch, 16 x 160 = 2560 samples."""
        return DOWNSAMPLE_RATE

    # ------------------------------------------------------------------ helpers

    def clip_fbank(self, wav: torch.Tensor) -> torch.Tensor:
        """Normalised fbank of one clip, (16 * num_steps(len(wav)), 128)."""
        return clip_fbank(wav, self.norm_mean, self.norm_std)

    def _pool(self, grid: torch.Tensor) -> torch.Tensor:
        """(n, t, F, D) patch grid -> (n, t, H)."""
        return grid.mean(dim=2) if self.freq_pool == "mean" else grid.flatten(2)

    def forward(self, wavs: List[torch.Tensor]) -> Dict[str, object]:
        if len(wavs) == 0:
            raise ValueError("empty batch")
        fbanks = [self.clip_fbank(w) for w in wavs]
        per_clip = encode_windows(self.encoder, fbanks, self.window_frames, self.max_windows_per_batch, self._pool)
        padded = [pad_sequence(list(seqs), batch_first=True) for seqs in zip(*per_clip)]
        return {"hidden_states": padded[:-1], "last_hidden_state": padded[-1]}
