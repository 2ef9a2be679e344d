"""s3prl upstream for this plugin's pretrained :class:`AudioEncoder` (s3prl's
``upstream/example`` layout: ``UpstreamExpert`` here, the hub entry in ``hubconf.py``).

Input: a list of 1-D 16 kHz waveforms of any length (one sample up to minutes).
Output: ``{"hidden_states": [depth + 1 tensors (B, T, H)], "last_hidden_state": (B, T, H)}``.

How a clip becomes features (the pretraining front end, nothing re-implemented):

1. ``T_i = len(range(0, S_i, 2560))`` time steps for a clip of ``S_i`` samples (s3prl's
   length contract; one step = one 16-frame time patch = 16 x 160 samples = 160 ms).
2. ``wav_to_fbank(wav_i, 16 * T_i)`` from the clip's own, unpadded samples (Kaldi fbank
   yields a few frames fewer than ``S_i / 160``; the missing frames are zero-padded in the
   unnormalised fbank, exactly as pretraining pads short clips), then ``normalize_fbank``
   with the checkpoint's stats.
3. The fbank is cut into windows of ``window_frames`` (default: the encoder's
   ``max_frames``, 1024 = 10.24 s); the last window keeps its own length (no padding). All
   windows of the batch with the same length run through
   ``AudioEncoder.extract_features`` together, so every window is encoded with exactly its
   own patches: a clip's features do not depend on the other clips in the batch or on the
   batch padding (exact up to float rounding).
4. Per layer: drop the cls token, view the time-major tokens as (t, 8 freq patches, D) and
   pool the 8 frequency patches -- mean (default, H = D) or concatenation
   (``freq_pool="concat"``, H = 8 * D, low to high frequency) -- then concatenate the
   windows along time and zero-pad the batch to the longest clip.

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
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence

from mam_clap_plugin.checkpoint import load_encoder_with_stats
from mam_clap_plugin.data.audio import FRAME_SHIFT_MS, SAMPLE_RATE, normalize_fbank, wav_to_fbank
from mam_clap_plugin.modules.encoder import PATCH_SIZE

try:  # s3prl's base class (hooks support); the expert works without s3prl installed too
    from s3prl.upstream.interfaces import UpstreamBase as _Base
except ImportError:  # pragma: no cover - s3prl is an optional dependency
    _Base = nn.Module

#: Samples per fbank frame (10 ms at 16 kHz).
HOP_SAMPLES = SAMPLE_RATE * FRAME_SHIFT_MS // 1000
#: Samples per output step: one 16-frame time patch.
DOWNSAMPLE_RATE = PATCH_SIZE * HOP_SAMPLES  # 2560
FREQ_POOLS = ("mean", "concat")


def num_steps(num_samples: int) -> int:
    """Output length for a clip of ``num_samples`` samples: ``len(range(0, S, 2560))``."""
    return len(range(0, num_samples, DOWNSAMPLE_RATE))


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
            (``examples/export_encoder.py``, safetensors or ``.pt``) or a converted AudioMAE
            file (``examples/convert/audiomae_to_mam_clap.py``); torch files load with
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
        if freq_pool not in FREQ_POOLS:
            raise ValueError(f"freq_pool must be one of {FREQ_POOLS}, got {freq_pool!r}")
        bundle = load_encoder_with_stats(ckpt, trusted=trusted)
        self.name = "[SupMAM-CLAP UpstreamExpert]"
        self.ckpt = ckpt
        self.encoder = bundle.encoder
        self.norm_mean, self.norm_std = bundle.norm_mean, bundle.norm_std
        self.freq_pool = freq_pool
        max_frames = self.encoder.grid_time * PATCH_SIZE
        window_frames = int(window_frames or max_frames)
        if window_frames % PATCH_SIZE or not 0 < window_frames <= max_frames:
            raise ValueError(f"window_frames={window_frames} must be a positive multiple of {PATCH_SIZE} <= {max_frames}")
        self.window_frames = window_frames
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
        if wav.dim() != 1:
            raise ValueError(f"expected 1-D waveforms, got shape {tuple(wav.shape)}")
        if wav.shape[0] == 0:
            raise ValueError("empty waveform (0 samples)")
        frames = PATCH_SIZE * num_steps(wav.shape[0])
        return normalize_fbank(wav_to_fbank(wav, target_length=frames), self.norm_mean, self.norm_std)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, 1 + t * F, D) with cls -> (n, t, H)."""
        n, _, dim = tokens.shape
        grid = tokens[:, 1:].reshape(n, -1, self.encoder.grid_freq, dim)
        return grid.mean(dim=2) if self.freq_pool == "mean" else grid.flatten(2)

    def _encode(self, windows: torch.Tensor) -> List[torch.Tensor]:
        """(n, frames, 128) equal-length windows -> depth + 2 pooled tensors (n, t, H)
        (each layer, then the final normalised output)."""
        step = self.max_windows_per_batch or windows.shape[0]
        chunks = []
        for start in range(0, windows.shape[0], step):
            out = self.encoder.extract_features(windows[start:start + step].unsqueeze(1))
            chunks.append([self._pool(h) for h in out["layer_results"]] + [self._pool(out["x"])])
        if len(chunks) == 1:
            return chunks[0]
        return [torch.cat(parts) for parts in zip(*chunks)]

    def forward(self, wavs: List[torch.Tensor]) -> Dict[str, object]:
        if len(wavs) == 0:
            raise ValueError("empty batch")
        fbanks = [self.clip_fbank(w) for w in wavs]
        # (clip, window index) per window, grouped by window length
        groups: Dict[int, List[Tuple[int, int, torch.Tensor]]] = defaultdict(list)
        for i, fb in enumerate(fbanks):
            for k, start in enumerate(range(0, fb.shape[0], self.window_frames)):
                win = fb[start:start + self.window_frames]
                groups[win.shape[0]].append((i, k, win))
        pieces: Dict[Tuple[int, int], List[torch.Tensor]] = {}
        for frames in sorted(groups):
            members = groups[frames]
            outs = self._encode(torch.stack([w for _, _, w in members]))
            for j, (i, k, _) in enumerate(members):
                pieces[(i, k)] = [o[j] for o in outs]
        num_outputs = self.num_layers + 1
        per_output: List[List[torch.Tensor]] = [[] for _ in range(num_outputs)]
        for i, fb in enumerate(fbanks):
            n_win = -(-fb.shape[0] // self.window_frames)
            for layer in range(num_outputs):
                per_output[layer].append(torch.cat([pieces[(i, k)][layer] for k in range(n_win)], dim=0))
        padded = [pad_sequence(seqs, batch_first=True) for seqs in per_output]
        return {"hidden_states": padded[:-1], "last_hidden_state": padded[-1]}
