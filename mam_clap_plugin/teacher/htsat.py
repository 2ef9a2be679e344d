"""HTS-AT (Swin Transformer over a folded log-mel image), inference only.

A re-implementation of the audio tower of LAION-CLAP / MS-CLAP (Chen et al., "HTS-AT: a
hierarchical token-semantic audio transformer", ICASSP 2022). Module and parameter names follow
the reference code so that a CLAP checkpoint loads with ``load_state_dict(strict=True)``:

    patch_embed.{proj,norm}
    layers.{i}.blocks.{j}.{norm1,attn.{relative_position_bias_table,relative_position_index,qkv,proj},
                           norm2,mlp.{fc1,fc2},attn_mask (shifted blocks only)}
    layers.{i}.downsample.{norm,reduction}          (all stages but the last)
    norm

Shapes (HTSAT-tiny, embed C0 = 96; HTSAT-base C0 = 128):

    image (B, 1, 256, 256) --patch_embed--> (B, 64*64, C0)
    stage 0: 64x64, C0  -> merge -> stage 1: 32x32, 2*C0 -> merge -> stage 2: 16x16, 4*C0
        -> merge -> stage 3: 8x8, 8*C0 -> norm

The image is a (B, 1, 1024, 64) log-mel spectrogram folded into 4 time chunks of 256 frames,
stacked along the frequency (height) axis: row = chunk * 64 + mel bin, column = frame in chunk.
:func:`fold_spectrogram` does that and :func:`unfold_tokens` regroups a token map back into
(frequency cell, time) order.

The window attention runs through ``F.scaled_dot_product_attention`` with the relative position
bias (plus the shifted-window mask) as a float ``attn_mask``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules.decoder import shifted_window_mask as window_region_mask
from ..modules.decoder import window_merge, window_partition
from ..modules.transformer import Mlp

#: Side of the square spectrogram image the Swin stages see.
SPEC_SIZE = 256
#: Additive mask value of the reference implementation for keys outside a query's shifted window.
SHIFT_MASK_VALUE = -100.0


def fold_spectrogram(x: Tensor, mel_bins: int) -> Tensor:
    """Resample a log-mel spectrogram to 1024 frames and fold it into the 256x256 image.

    x: (B, 1, T, mel_bins) with T <= 1024 -> (B, 1, 256, 256). T is stretched to
    ``SPEC_SIZE * ratio`` frames by bicubic interpolation (align_corners=True), ratio =
    256 // mel_bins chunks of 256 frames, stacked along the height: row = chunk * mel_bins + bin.
    """
    ratio = SPEC_SIZE // mel_bins
    B, _, T, M = x.shape
    target_t = SPEC_SIZE * ratio
    if T > target_t or M != mel_bins or mel_bins * ratio != SPEC_SIZE:
        raise ValueError(f"cannot fold a ({T}, {M}) spectrogram into a {SPEC_SIZE}x{SPEC_SIZE} image")
    if T < target_t:
        x = F.interpolate(x, (target_t, M), mode="bicubic", align_corners=True)
    x = x.transpose(2, 3).reshape(B, 1, M, ratio, SPEC_SIZE)  # (B, 1, mel, chunk, frame)
    return x.transpose(2, 3).reshape(B, 1, ratio * M, SPEC_SIZE)


def unfold_tokens(x: Tensor, resolution: tuple[int, int], ratio: int) -> Tensor:
    """Regroup a token map of the folded image into (frequency cell, time) order.

    x: (B, H*W, C) tokens in row-major (H, W) order, H = ratio * Fc (chunk-major rows)
    -> (B, Fc, ratio * W, C): frequency cell low to high, time index = chunk * W + column.
    """
    B, _, C = x.shape
    H, W = resolution
    x = x.view(B, ratio, H // ratio, W, C).transpose(1, 2)  # (B, Fc, chunk, W, C)
    return x.reshape(B, H // ratio, ratio * W, C)


def relative_position_index(window: int) -> Tensor:
    """(window^2, window^2) index into the (2*window-1)^2 relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(resolution: tuple[int, int], window: int, shift: int) -> Tensor:
    """(nW, window^2, window^2) additive mask: 0 within a region of the rolled image, -100 across
    (the decoder's region mask, in the reference implementation's additive form)."""
    same_region = window_region_mask(*resolution, (window, window), (shift, shift)).squeeze(1)
    return torch.where(same_region, 0.0, SHIFT_MASK_VALUE)


class PatchEmbed(nn.Module):
    """Non-overlapping patches: (B, 1, 256, 256) -> (B, (256/p)^2, C), LayerNorm'ed."""

    def __init__(self, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> Tensor:
        """(nH, N, N) bias, N = window^2."""
        N = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B * nW, N, C), windows of one image consecutive; mask: (nW, N, N) or None."""
        BW, N, C = x.shape
        nH = self.num_heads
        q, k, v = self.qkv(x).view(BW, N, 3, nH, C // nH).permute(2, 0, 3, 1, 4)  # each (BW, nH, N, hd)
        # 4-D float masks (leading 1 broadcast over the batch) keep SDPA on its fused CPU kernel.
        bias = self.position_bias()
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None].to(q.dtype))
        else:
            # Fold windows into the head axis so the (nW, nH, N, N) mask broadcasts over the batch.
            nW = mask.shape[0]
            q, k, v = (t.reshape(BW // nW, nW * nH, N, C // nH) for t in (q, k, v))
            attn_mask = (bias[None] + mask[:, None]).reshape(1, nW * nH, N, N).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).view(BW, nH, N, C // nH)
        return self.proj(out.transpose(1, 2).reshape(BW, N, C))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block + MLP, (B, H*W, C) -> (B, H*W, C).

    As in the reference, a stage whose resolution is not larger than the window uses one window
    covering the whole map and no shift.
    """

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, shift: int):
        super().__init__()
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        self.resolution = resolution
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4.0)
        if shift:
            self.register_buffer("attn_mask", shifted_window_mask(resolution, window, shift))
        else:
            self.attn_mask = None

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        H, W = self.resolution
        y = self.norm1(x).view(B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, (self.window, self.window)), self.attn_mask)
        y = window_merge(y, (self.window, self.window), B, H, W)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm + Linear: (B, H*W, C) -> (B, H/2*W/2, 2C)."""

    def __init__(self, dim: int, resolution: tuple[int, int]):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, _, C = x.shape
        H, W = self.resolution
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    """``depth`` blocks (every second one shifted by window/2), then an optional PatchMerging."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 downsample: bool):
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, shift=0 if i % 2 == 0 else window // 2)
            for i in range(depth))
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class HTSAT(nn.Module):
    """The Swin part of HTS-AT: folded log-mel image -> token maps.

    Args:
        embed_dim: width C0 of stage 0 (96 tiny, 128 base); stage i has width C0 * 2^i.
        depths: blocks per stage, e.g. (2, 2, 6, 2).
        num_heads: attention heads per stage, e.g. (4, 8, 16, 32).
        window: attention window side (8).
        patch_size: patch side of the patch embedding (4).
        mel_bins: mel bins of the spectrogram folded into the image (64 -> 4 time chunks).
    """

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], window: int = 8,
                 patch_size: int = 4, mel_bins: int = 64):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        self.mel_bins = mel_bins
        self.ratio = SPEC_SIZE // mel_bins
        side = SPEC_SIZE // patch_size
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            res = (side >> i, side >> i)
            self.layers.append(SwinStage(embed_dim << i, res, depth, heads, window,
                                         downsample=i < len(depths) - 1))
        self.num_features = embed_dim << (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def stage_shape(self, stage: int) -> tuple[int, int, int]:
        """(grid_freq, grid_time, width) of the unfolded map after ``stage``'s blocks."""
        H, W = self.layers[stage].resolution
        return H // self.ratio, self.ratio * W, self.patch_embed.proj.out_channels << stage

    def forward(self, image: Tensor) -> Tensor:
        """image (B, 1, 256, 256) -> unfolded map (B, grid_freq, grid_time, width) of the last
        stage, after ``norm`` if the network has one (a teacher cut after stage 3 has none)."""
        x = self.patch_embed(image)
        for stage in self.layers:
            x = stage(x)
        if self.norm is not None:
            x = self.norm(x)
        return unfold_tokens(x, self.layers[-1].resolution, self.ratio)
