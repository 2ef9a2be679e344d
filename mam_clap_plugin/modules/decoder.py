"""Decoder with shifted local (window) attention over the (time, freq) patch grid.

The paper's decoder is "a single transformer block with shifted local attention", in
the AudioMAE framework it builds on; AudioMAE's decoder is a stack of 16 such blocks.
Both are this module: :class:`WindowDecoder` with ``depth=1`` or ``depth=16``, 4x4
windows, shift (2, 0).

**Block** (``block``, the model's ``model.decoder_block``):

* ``swinv2`` (:class:`SwinV2Block`): the Swin Transformer V2 block (Liu et al. 2022) that
  AudioMAE's decoder uses, written from the published description: post-norm residuals
  ``x + LN(attn(x))`` then ``x + LN(mlp(x))``; scaled cosine attention
  ``cos(q_i, k_j) * s_h + B_h(i, j)`` with a learned per-head logit scale ``s_h`` (stored as
  ``log s_h``, initialised to ``log 10`` and clamped at ``log 100``); a continuous position
  bias ``B_h`` from a small MLP (2 -> 384 -> ReLU -> heads) over the log-spaced relative
  coordinates ``sign(d) * log(1 + |d|)`` of every pair of tokens in a window. No dropout
  (pretraining uses none); Linear layers start Xavier-uniform like the rest of the decoder.
* ``vit`` (:class:`~.transformer.Block`): a pre-norm ViT block with scaled dot-product
  attention and no position bias (the encoder's block).

Both run attention through ``F.scaled_dot_product_attention``: for ``swinv2`` the
normalised queries carry the logit scale and ``scale=1``, and the position bias plus the
shift mask enter as a float ``attn_mask``.

**Which blocks shift.** Blocks alternate plain and shifted windows, ending with a shifted
one: block ``i`` of ``depth`` shifts when ``depth - 1 - i`` is even. With AudioMAE's 16
blocks that is AudioMAE's (and Swin's) order, the first block plain and every second one
shifted; the paper's single block is then the shifted block it describes ("shifted local
attention"), which a first-block-plain rule would leave unshifted.

A shifted block rolls the grid by ``-shift``, attends inside each window, and rolls
back. Windows that wrap around the grid edge are split into their original regions
with an attention mask, as in Swin, so no token attends across the wrap.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..optim import set_overrides
from .encoder import gather_tokens
from .transformer import Block, Mlp, sincos_pos_embed_2d

#: The decoder blocks :class:`WindowDecoder` builds (``model.decoder_block``).
DECODER_BLOCKS = ("swinv2", "vit")
#: Swin V2's bounds on the cosine-attention logit scale: initial value 10, at most 100.
LOGIT_SCALE_INIT = 10.0
LOGIT_SCALE_MAX = 100.0
#: Hidden width of Swin V2's continuous position bias MLP (timm's swin_transformer_v2_cr default).
CPB_HIDDEN = 384


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


@functools.lru_cache(maxsize=32)
def batched_window_mask(
    t: int, f: int, window: Tuple[int, int], shift: Tuple[int, int], batch: int, device: torch.device
) -> torch.Tensor:
    """:func:`shifted_window_mask` repeated for ``batch`` clips: (batch * num_windows, 1, L, L),
    the layout of :func:`window_partition`'s output. Cached per batch size as well (built once,
    not every step; do not modify)."""
    mask = shifted_window_mask(t, f, window, shift, device)
    return mask.repeat(batch, 1, 1, 1)


@functools.lru_cache(maxsize=32)
def shifted_window_bias(
    t: int, f: int, window: Tuple[int, int], shift: Tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`shifted_window_mask` as an additive float mask: (num_windows, 1, L, L), 0 where two
    tokens may attend to each other and ``-inf`` across the wrap. Cached per grid, window, shift,
    device and dtype (built once, not every step; do not modify)."""
    same = shifted_window_mask(t, f, window, shift, device)
    return torch.zeros(same.shape, device=device, dtype=dtype).masked_fill(~same, float("-inf"))


def saved_block_kind(state_dict, prefix: str = "decoder.") -> Optional[str]:
    """Which :data:`DECODER_BLOCKS` entry a saved :class:`WindowDecoder` (keys under ``prefix``)
    was built from: ``swinv2`` blocks hold a logit scale, ``vit`` blocks do not. None when the
    state holds no decoder block."""
    blocks = [k for k in state_dict if k.startswith(prefix + "blocks.")]
    if not blocks:
        return None
    return "swinv2" if any(k.endswith(".attn.logit_scale") for k in blocks) else "vit"


def log_relative_coordinates(window: Tuple[int, int]) -> torch.Tensor:
    """Swin V2's log-spaced relative coordinates of every token pair in a window.

    Tokens are numbered row-major (``p = time * window[1] + freq``, the order of
    :func:`window_partition`). Returns (L, L, 2) float32 with entry ``[i, j]`` =
    ``sign(d) * log(1 + |d|)`` for ``d = (time_i - time_j, freq_i - freq_j)``.
    """
    coords = torch.stack(
        torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij"), dim=-1
    ).reshape(-1, 2)
    rel = (coords[:, None, :] - coords[None, :, :]).float()
    return torch.sign(rel) * torch.log1p(rel.abs())


class CosineWindowAttention(nn.Module):
    """Swin V2 window attention: scaled cosine attention plus a continuous position bias.

    ``logits[h, i, j] = s_h * cos(q_i, k_j) + B_h(i, j)`` (+ the shift mask), with
    ``s_h = exp(min(logit_scale_h, log 100))`` learned per head (initial value 10) and
    ``B = cpb_mlp(log_relative_coordinates(window))``. Runs on
    ``F.scaled_dot_product_attention`` with the scale folded into the normalised queries
    and the bias (plus mask) as a float ``attn_mask``.

    Args:
        dim: token width D.
        num_heads: attention heads; ``dim`` must be divisible by it.
        window: (time, freq) window size in tokens.
        cpb_hidden: hidden width of the position-bias MLP.
    """

    def __init__(self, dim: int, num_heads: int, window: Tuple[int, int], cpb_hidden: int = CPB_HIDDEN):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = tuple(window)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.full((num_heads,), math.log(LOGIT_SCALE_INIT)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(inplace=True), nn.Linear(cpb_hidden, num_heads))
        self.register_buffer("relative_coords", log_relative_coordinates(self.window), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """(heads, L, L) bias ``B_h(i, j)`` from the MLP over the relative coordinates."""
        L = self.window[0] * self.window[1]
        return self.cpb_mlp(self.relative_coords.reshape(L * L, 2)).t().reshape(self.num_heads, L, L)

    def scale(self) -> torch.Tensor:
        """(heads,) logit scale ``s_h``, clamped at 100."""
        return self.logit_scale.clamp(max=math.log(LOGIT_SCALE_MAX)).exp()

    def forward(self, x: torch.Tensor, shift_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B * nW, L, D), the nW windows of each clip consecutive (:func:`window_partition`);
        shift_mask: (nW, 1, L, L) additive float (:func:`shifted_window_bias`) or None. Returns (B * nW, L, D)."""
        BW, L, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).reshape(BW, L, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # (BW, H, L, hd)
        q = F.normalize(q, dim=-1) * self.scale().to(q.dtype).view(1, H, 1, 1)
        k = F.normalize(k, dim=-1)
        bias = self.position_bias().to(q.dtype)
        if shift_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=1.0)
        else:
            # fold the windows into the head axis: the (nW, H, L, L) mask then broadcasts over the clips
            nW = shift_mask.shape[0]
            q, k, v = (t.reshape(BW // nW, nW * H, L, D // H) for t in (q, k, v))
            # in q's dtype: under autocast q is half precision while the grid (and the cached mask) is float32
            mask = (bias.unsqueeze(0) + shift_mask.to(q.dtype)).reshape(1, nW * H, L, L)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0).reshape(BW, H, L, D // H)
        return self.proj(out.transpose(1, 2).reshape(BW, L, D))


class SwinV2Block(nn.Module):
    """Swin V2 post-norm block on windows: ``x + LN(attn(x))``, then ``x + LN(mlp(x))``.

    Args:
        dim: token width D.
        num_heads: attention heads.
        window: (time, freq) window size in tokens.
        mlp_ratio: MLP width as a multiple of ``dim``.
    """

    def __init__(self, dim: int, num_heads: int, window: Tuple[int, int], mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = CosineWindowAttention(dim, num_heads, window)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, shift_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B * nW, L, D) -> (B * nW, L, D); shift_mask as in :class:`CosineWindowAttention`."""
        x = x + self.norm1(self.attn(x, shift_mask))
        return x + self.norm2(self.mlp(x))


class WindowBlock(nn.Module):
    """A :class:`SwinV2Block` (``block="swinv2"``) or a ViT :class:`Block` (``block="vit"``)
    applied inside (optionally shifted) local windows of a (B, t, f, D) grid."""

    def __init__(self, dim: int, num_heads: int, window: Tuple[int, int], shift: Tuple[int, int], mlp_ratio: float,
                 block: str = "swinv2"):
        super().__init__()
        if any(s < 0 or s >= w for s, w in zip(shift, window)):
            raise ValueError(f"decoder shift {shift} must be within [0, window) for window {window}")
        if block not in DECODER_BLOCKS:
            raise ValueError(f"decoder block {block!r} is not one of {DECODER_BLOCKS}")
        self.window = tuple(window)
        self.shift = tuple(shift)
        self.kind = block
        self.block = SwinV2Block(dim, num_heads, self.window, mlp_ratio) if block == "swinv2" else Block(
            dim, num_heads, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, t, f, D) -> (B, t, f, D)."""
        B, t, f, _ = x.shape
        shifted = any(self.shift)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        windows = window_partition(x, self.window)
        mask = None
        if shifted and self.kind == "swinv2":
            mask = shifted_window_bias(t, f, self.window, self.shift, x.device, x.dtype)
        elif shifted:
            mask = batched_window_mask(t, f, self.window, self.shift, B, x.device)
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
        shift: (time, freq) shift of the shifted blocks: block ``i`` shifts when
            ``depth - 1 - i`` is even (the last block shifts; see the module docstring).
        grid_time, grid_freq: the largest patch grid (position table size).
        mlp_ratio: MLP width of each block as a multiple of ``embed_dim``.
        block: ``swinv2`` (AudioMAE's Swin V2 block) or ``vit`` (pre-norm ViT block).
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
        block: str = "swinv2",
    ):
        super().__init__()
        self.window = tuple(window)
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = set_overrides(nn.Parameter(torch.zeros(1, 1, embed_dim)), weight_decay=0.0)
        self.grid_time, self.grid_freq = grid_time, grid_freq
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid_time, grid_freq).unsqueeze(0))
        self.blocks = nn.ModuleList(
            [
                WindowBlock(embed_dim, num_heads, self.window, tuple(shift) if (depth - 1 - i) % 2 == 0 else (0, 0),
                            mlp_ratio, block)
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
