"""Transformer building blocks shared by the encoder and the decoder.

Pre-norm ViT blocks in the style of timm's ``vision_transformer.py``. Attention runs
through :func:`torch.nn.functional.scaled_dot_product_attention`, which accepts an
optional boolean mask (``True`` = may attend) used by the shifted-window decoder.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: token width D.
        num_heads: number of heads; ``dim`` must be divisible by it.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, D); attn_mask: broadcastable to (B, heads, N, N), bool. Returns (B, N, D)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # unbind (not indexing) keeps the backward free of zero-fills
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, hidden width ``dim * mlp_ratio``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of the
    samples (probability ``drop_prob``) and scale the kept ones by ``1 / (1 - drop_prob)``.
    Identity in eval mode or at ``drop_prob == 0``. Uses the global torch RNG."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, ...) -> same shape."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

    ``drop_path`` (stochastic depth) is 0 by default: pretraining uses none; fine-tuning
    sets it through :meth:`AudioEncoder.set_drop_path`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sincos_pos_embed_2d(dim: int, grid_time: int, grid_freq: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position table on the real (time, freq) grid.

    Half of the channels encode the time index, half the frequency index, each with
    the standard 1D sin/cos code (frequencies 1 / 10000^(2i/d)).

    Returns:
        (grid_time * grid_freq, dim) float32, time-major (row ``t * grid_freq + f``).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")

    def one_axis(positions: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.outer(positions, omega)  # (P, d/2)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (P, d)

    t, f = np.meshgrid(np.arange(grid_time), np.arange(grid_freq), indexing="ij")
    emb = np.concatenate([one_axis(t.reshape(-1), dim // 2), one_axis(f.reshape(-1), dim // 2)], axis=1)
    return torch.from_numpy(emb).float()
