"""Decoder with shifted local (window) attention over the (time, freq) patch grid.

The paper's decoder is one transformer block with shifted local attention: a 4x4
window shifted by 2 in time. AudioMAE's 16-block decoder is the same module with
``depth=16``. Blocks alternate, starting with a shifted one: block ``i`` uses the
shift when ``i`` is even and plain windows otherwise.

A shifted block rolls the grid by ``-shift``, attends inside each window, and rolls
back. Windows that wrap around the grid edge are split into their original regions
with an attention mask, as in Swin, so no token attends across the wrap.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..optim import set_overrides
from .encoder import gather_tokens
from .transformer import Block, sincos_pos_embed_2d


def window_partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """(B, t, f, D) -> (B * num_windows, wt * wf, D), windows in row-major order."""
    B, t, f, D = x.shape
    wt, wf = window
    x = x.view(B, t // wt, wt, f // wf, wf, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wt * wf, D)


def window_merge(x: torch.Tensor, window: Tuple[int, int], batch: int, t: int, f: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, wt * wf, D) -> (B, t, f, D)."""
    wt, wf = window
    D = x.shape[-1]
    x = x.view(batch, t // wt, f // wf, wt, wf, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, t, f, D)


@functools.lru_cache(maxsize=32)
def shifted_window_mask(
    t: int, f: int, window: Tuple[int, int], shift: Tuple[int, int], device: Optional[torch.device] = None
) -> torch.Tensor:
    """Boolean attention mask for a grid rolled by ``-shift``.

    Returns (num_windows, 1, wt * wf, wt * wf) on ``device``; True where two tokens of a
    window came from the same region of the unrolled grid and may attend to each other.
    Cached per grid, window, shift and device (built once, not every step; do not modify).
    """
    region = torch.zeros(1, t, f, 1, device="cpu")  # never the ambient default device: the result is cached
    label = 0
    for ts in ((0, t - window[0]), (t - window[0], t - shift[0]), (t - shift[0], t)):
        for fs in ((0, f - window[1]), (f - window[1], f - shift[1]), (f - shift[1], f)):
            region[:, ts[0] : ts[1], fs[0] : fs[1]] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, wt*wf)
    return (ids.unsqueeze(1) == ids.unsqueeze(2)).unsqueeze(1).to(device)


class WindowBlock(nn.Module):
    """A transformer :class:`Block` applied inside (optionally shifted) local windows."""

    def __init__(self, dim: int, num_heads: int, window: Tuple[int, int], shift: Tuple[int, int], mlp_ratio: float):
        super().__init__()
        if any(s < 0 or s >= w for s, w in zip(shift, window)):
            raise ValueError(f"decoder shift {shift} must be within [0, window) for window {window}")
        self.window = window
        self.shift = shift
        self.block = Block(dim, num_heads, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, t, f, D) -> (B, t, f, D)."""
        B, t, f, _ = x.shape
        shifted = any(self.shift)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        windows = window_partition(x, self.window)
        mask = None
        if shifted:
            mask = shifted_window_mask(t, f, self.window, self.shift, x.device)
            n_win = mask.shape[0]
            mask = mask.unsqueeze(0).expand(B, -1, -1, -1, -1).reshape(B * n_win, *mask.shape[1:])
        x = window_merge(self.block(windows, mask), self.window, B, t, f)
        if shifted:
            x = torch.roll(x, shifts=self.shift, dims=(1, 2))
        return x


class WindowDecoder(nn.Module):
    """Fills mask tokens into the visible encoder output and decodes the full grid.

    Args:
        encoder_dim: width of the encoder output.
        embed_dim: decoder width.
        depth: number of window blocks (paper: 1; AudioMAE: 16).
        num_heads: attention heads.
        window: (time, freq) window size in patches.
        shift: (time, freq) shift of the shifted blocks.
        grid_time, grid_freq: the largest patch grid (position table size).
    """

    def __init__(
        self,
        encoder_dim: int,
        embed_dim: int = 512,
        depth: int = 1,
        num_heads: int = 16,
        window: Tuple[int, int] = (4, 4),
        shift: Tuple[int, int] = (2, 0),
        grid_time: int = 64,
        grid_freq: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.window = tuple(window)
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = set_overrides(nn.Parameter(torch.zeros(1, 1, embed_dim)), weight_decay=0.0)
        self.grid_time, self.grid_freq = grid_time, grid_freq
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid_time, grid_freq).unsqueeze(0))
        self.blocks = nn.ModuleList(
            [
                WindowBlock(embed_dim, num_heads, self.window, tuple(shift) if i % 2 == 0 else (0, 0), mlp_ratio)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def check_grid(self, t: int, f: int) -> None:
        if t % self.window[0] or f % self.window[1]:
            raise ValueError(
                f"patch grid {t}x{f} (time x freq) is not divisible by the decoder window "
                f"{self.window[0]}x{self.window[1]}; choose task.target_length as a multiple of "
                f"{16 * self.window[0]} frames or change model.decoder_window_*"
            )

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """
        Args:
            visible: (B, N_vis, D_enc) encoder output without the cls token.
            ids_restore: (B, N) from :class:`~mam_clap_plugin.modules.encoder.Masking`.
            grid: (t, f) patch grid with ``t * f == N``.
        Returns:
            (B, N, D_dec) decoded tokens in grid (time-major) order.
        """
        t, f = grid
        self.check_grid(t, f)
        x = self.embed(visible)
        B, n_vis, D = x.shape
        x = torch.cat([x, self.mask_token.expand(B, t * f - n_vis, D)], dim=1)
        x = gather_tokens(x, ids_restore)
        pos = self.pos_embed.reshape(1, self.grid_time, self.grid_freq, D)[:, :t]
        x = x.view(B, t, f, D) + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x.reshape(B, t * f, D))
