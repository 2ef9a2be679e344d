"""Encoder features for clips of any length: the windowing shared by the s3prl upstream
(``upstream/expert.py``) and ``examples/extract_features.py``.

    clip_fbank(wav, mean, std)                 -> (16 * num_steps(S), 128) normalised fbank
    encode_windows(encoder, fbanks, frames)    -> per clip: depth + 2 token grids (t, F, D)
    pool_outputs(outputs, level, layer)        -> one clip's feature at a level and layer

Also used by :mod:`mam_clap_plugin.hear` (the HEAR API) and :class:`mam_clap_plugin.hub.MamClapEncoder`.

1. A clip of ``S`` samples at 16 kHz has ``num_steps(S) = len(range(0, S, 2560))`` time
   steps (s3prl's length contract; one step = one 16-frame time patch = 160 ms).
2. Its fbank is ``wav_to_fbank(wav, 16 * num_steps(S))`` from its own, unpadded samples (Kaldi
   fbank yields a few frames fewer than ``S / 160``; the missing frames are zero-padded in
   the unnormalised fbank, exactly as pretraining pads short clips), normalised with the
   encoder's stats.
3. The fbank is cut into windows of ``window_frames`` (the encoder's ``max_frames``: 1024 =
   10.24 s); the last window keeps its own length (no padding). All windows of all clips
   with the same length are encoded together, so each window is encoded with exactly its
   own patches: a clip's features do not depend on the other clips (exact up to float
   rounding).
4. Per output, the cls token is dropped, the time-major tokens are viewed as the grid
   (t, F, D) (F = 8 frequency patches), optionally pooled by ``pool``, and the windows are
   concatenated along time.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .data.audio import SHIFT_SAMPLES, normalize_fbank, wav_to_fbank
from .modules.encoder import PATCH_SIZE, AudioEncoder

#: Samples per output step: one 16-frame time patch of 10 ms frames.
DOWNSAMPLE_RATE = PATCH_SIZE * SHIFT_SAMPLES  # 2560
#: Feature levels of :func:`pool_outputs`.
LEVELS = ("clip", "frame", "patch")
#: Frequency pooling of a frame-rate output (the upstream's and HEAR's timestamps): the mean
#: over the frequency patches (D wide) or their concatenation, low to high (F * D wide).
FREQ_POOLS = ("mean", "concat")


def check_freq_pool(freq_pool: str) -> str:
    """``freq_pool`` if it is one of :data:`FREQ_POOLS`; else ValueError naming them."""
    if freq_pool not in FREQ_POOLS:
        raise ValueError(f"freq_pool must be one of {FREQ_POOLS}, got {freq_pool!r}")
    return freq_pool


def num_steps(num_samples: int) -> int:
    """Output length for a clip of ``num_samples`` samples: ``len(range(0, S, 2560))``."""
    return len(range(0, num_samples, DOWNSAMPLE_RATE))


def clip_fbank(wav: torch.Tensor, norm_mean: float, norm_std: float) -> torch.Tensor:
    """Normalised fbank of one 16 kHz clip (S,): (16 * num_steps(S), 128)."""
    if wav.dim() != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {tuple(wav.shape)}")
    if wav.shape[0] == 0:
        raise ValueError("empty waveform (0 samples)")
    frames = PATCH_SIZE * num_steps(wav.shape[0])
    return normalize_fbank(wav_to_fbank(wav, target_length=frames), norm_mean, norm_std)


def check_window(encoder: AudioEncoder, window_frames: Optional[int]) -> int:
    """``window_frames`` (default: the encoder's ``max_frames``), checked: a positive
    multiple of 16 no longer than ``max_frames``."""
    max_frames = encoder.grid_time * PATCH_SIZE
    window = int(window_frames or max_frames)
    if window % PATCH_SIZE or not 0 < window <= max_frames:
        raise ValueError(f"window_frames={window} must be a positive multiple of {PATCH_SIZE} <= {max_frames}")
    return window


def token_grid(tokens: torch.Tensor, grid_freq: int) -> torch.Tensor:
    """(n, 1 + t * F, D) tokens with cls first -> (n, t, F, D) patch grid."""
    n, _, dim = tokens.shape
    return tokens[:, 1:].reshape(n, -1, grid_freq, dim)


def _encode(encoder: AudioEncoder, windows: torch.Tensor, step: int,
            pool: Callable[[torch.Tensor], torch.Tensor]) -> List[torch.Tensor]:
    """(n, frames, 128) equal-length windows -> depth + 2 pooled grids (n, t, ...)."""
    chunks = []
    for start in range(0, windows.shape[0], step):
        out = encoder.extract_features(windows[start:start + step].unsqueeze(1))
        chunks.append([pool(token_grid(h, encoder.grid_freq)) for h in out["layer_results"] + [out["x"]]])
    if len(chunks) == 1:
        return chunks[0]
    return [torch.cat(parts) for parts in zip(*chunks)]


def encode_windows(encoder: AudioEncoder, fbanks: List[torch.Tensor], window_frames: int,
                   max_windows_per_batch: Optional[int] = None,
                   pool: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> List[List[torch.Tensor]]:
    """Encode clips of any length by windows (see the module docstring).

    Args:
        encoder: the encoder (its device and mode are the caller's).
        fbanks: normalised fbanks (frames_i, 128), frames_i a multiple of 16, on the
            encoder's device.
        window_frames: frames per window (:func:`check_window`).
        max_windows_per_batch: cap on windows per encoder call (memory); None: no cap.
        pool: maps a (n, t, F, D) grid to (n, t, ...); None keeps the grid.

    Returns:
        for each clip, depth + 2 tensors (t_i, ...): the patch embedding, each block's
        output, then the encoder's final output (after its norm).
    """
    pool = pool or (lambda grid: grid)
    groups: Dict[int, List[Tuple[int, int, torch.Tensor]]] = defaultdict(list)
    for i, fb in enumerate(fbanks):
        if fb.dim() != 2 or fb.shape[0] % PATCH_SIZE or fb.shape[0] == 0:
            raise ValueError(f"clip {i}: fbank of shape {tuple(fb.shape)}; frames must be a positive multiple of 16")
        for k, start in enumerate(range(0, fb.shape[0], window_frames)):
            win = fb[start:start + window_frames]
            groups[win.shape[0]].append((i, k, win))
    pieces: Dict[Tuple[int, int], List[torch.Tensor]] = {}
    for frames in sorted(groups):
        members = groups[frames]
        outs = _encode(encoder, torch.stack([w for _, _, w in members]),
                       max_windows_per_batch or len(members), pool)
        for j, (i, k, _) in enumerate(members):
            pieces[(i, k)] = [o[j] for o in outs]
    num_outputs = len(encoder.blocks) + 2
    result = []
    for i, fb in enumerate(fbanks):
        n_win = -(-fb.shape[0] // window_frames)
        result.append([torch.cat([pieces[(i, k)][out] for k in range(n_win)], dim=0) for out in range(num_outputs)])
    return result


def parse_layer(value, depth: int):
    """``"final"``, ``"all"`` or a hidden-state index 0..depth (an int or its text); raises
    ValueError naming the allowed values."""
    if value in ("final", "all"):
        return value
    try:
        layer = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"layer {value!r}: use final, all or a number 0..{depth}") from None
    if isinstance(value, float) and value != layer:
        raise ValueError(f"layer {value!r}: use final, all or a number 0..{depth}")
    if not 0 <= layer <= depth:
        raise ValueError(f"layer {layer}: the encoder has hidden states 0..{depth} (0 = patch embedding)")
    return layer


def pool_outputs(outputs: List[torch.Tensor], level: str, layer) -> torch.Tensor:
    """One clip's :func:`encode_windows` outputs (depth + 2 grids (T, F, D)) at a level and layer.

    ``layer``: ``"final"`` (the encoder's output after its final norm), a hidden state
    ``0..depth`` (0 = patch embedding with positions, N = block N), or ``"all"`` (the
    depth + 1 hidden states stacked first: (L, ...)). ``level``: ``"clip"`` (D,): mean over
    time and frequency; ``"frame"`` (T, D): mean over the F frequency patches of each 160 ms
    step; ``"patch"`` (T, F, D): the grid. Returns float32 on the outputs' device.
    """
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: use one of {LEVELS}")
    if layer == "final":
        x = outputs[-1]
    elif layer == "all":
        x = torch.stack(outputs[:-1])  # (L, T, F, D)
    else:
        x = outputs[layer]
    if level == "frame":
        x = x.mean(dim=-2)
    elif level == "clip":
        x = x.mean(dim=(-3, -2))
    return x.float()
