"""The one audio encoder of this project: an AudioMAE-style ViT over fbank patches.

Pretraining (:mod:`mam_clap_plugin.models.supmam_clap`), fine-tuning and the s3prl
upstream all use :class:`AudioEncoder`.

Layout:
    source fbank (B, 1, T, 128), T a multiple of 16 and at most ``max_frames``
      -> 16x16 conv patch embedding -> (B, t * 8, D) tokens, time-major
         (token ``i * 8 + j`` = time patch i, frequency patch j; t = T / 16)
      -> + fixed 2D sin-cos position table (a buffer, first t time columns)
      -> optional masking (same kept count for every clip): unstructured random masking
         (pretraining, ``mask_ratio``) or whole time columns / frequency rows of tokens
         (fine-tuning, ``mask_t_prob`` / ``mask_f_prob``, AudioMAE's SpecAugment on tokens)
      -> [cls] + visible tokens -> ViT blocks -> LayerNorm (Identity if ``final_norm=False``)
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .transformer import Block, sincos_pos_embed_2d

PATCH_SIZE = 16


class Masking(NamedTuple):
    """Result of :func:`random_masking` for a batch of B clips with N tokens each.

    ids_keep:    (B, N_vis) indices of the visible tokens.
    ids_restore: (B, N) permutation that puts [visible, masked] back in grid order.
    mask:        (B, N) bool, True where the token is masked.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Visible-token count for ratio gamma: ``int(N * (1 - gamma))`` (as in MAE)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


def random_masking(batch: int, num_tokens: int, mask_ratio: float, device=None) -> Masking:
    """Unstructured random masking: each clip keeps a uniformly random subset of tokens.

    Every clip keeps exactly :func:`num_visible` tokens, so the visible set stacks into
    a dense (B, N_vis, D) tensor. Uses the global torch RNG (seeded per update by
    fairseq, so resumed runs draw the same masks).
    """
    n_keep = num_visible(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    mask[:, :n_keep] = False
    mask = mask.gather(1, ids_restore)
    return Masking(ids_shuffle[:, :n_keep], ids_restore, mask)


def time_freq_masking(batch: int, grid_time: int, grid_freq: int, mask_t_prob: float, mask_f_prob: float,
                      device=None) -> Masking:
    """Mask whole time columns and whole frequency rows of the (grid_time, grid_freq) token grid.

    Each clip keeps ``int(grid_time * (1 - mask_t_prob))`` random time columns and
    ``int(grid_freq * (1 - mask_f_prob))`` random frequency rows (at least one of each);
    a token stays visible when both its column and its row are kept (AudioMAE's
    fine-tuning masking: at 0.2 / 0.2 on 64 x 8 patches, 51 columns x 6 rows). Visible
    tokens keep their grid order in ``ids_keep``. Uses the global torch RNG.
    """
    def kept(n: int, prob: float) -> tuple[torch.Tensor, int]:
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"time/frequency mask probability must be in [0, 1), got {prob}")
        n_keep = max(1, int(n * (1.0 - prob)))
        order = torch.rand(batch, n, device=device).argsort(dim=1)
        keep = torch.zeros(batch, n, dtype=torch.bool, device=device)
        return keep.scatter_(1, order[:, :n_keep], True), n_keep

    (keep_t, n_t), (keep_f, n_f) = kept(grid_time, mask_t_prob), kept(grid_freq, mask_f_prob)
    mask = ~(keep_t[:, :, None] & keep_f[:, None, :]).reshape(batch, grid_time * grid_freq)
    ids_shuffle = mask.to(torch.uint8).argsort(dim=1, stable=True)  # visible first, grid order
    n_keep = n_t * n_f  # known on the host: no sync to count the visible tokens
    return Masking(ids_shuffle[:, :n_keep], ids_shuffle.argsort(dim=1), mask)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D), ids: (B, M) -> (B, M, D)."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


#: The model config's encoder fields (``model.encoder_*``, ``models/encoder_config.py``) -> the
#: :class:`AudioEncoder` argument each sets.
MODEL_CONFIG_FIELDS = {"encoder_embed_dim": "embed_dim", "encoder_layers": "depth",
                       "encoder_attention_heads": "num_heads", "mlp_ratio": "mlp_ratio", "max_frames": "max_frames"}


class AudioEncoder(nn.Module):
    """ViT encoder over 16x16 fbank patches (ViT-B: 768 dims, 12 layers, 12 heads).

    Args:
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of D.
        max_frames: longest input in fbank frames; fixes the position-table grid
            (1024 frames -> 64 time patches).
        num_mel_bins: fbank bins (128 -> 8 frequency patches).
        drop_path: stochastic-depth rate of the last block (see :meth:`set_drop_path`);
            0 (pretraining) disables it.
        final_norm: end with a LayerNorm (True); False leaves the last block's output as
            it is, as AudioMAE's fine-tuned encoders do (they pool, then apply ``fc_norm``).
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        max_frames: int = 1024,
        num_mel_bins: int = 128,
        drop_path: float = 0.0,
        final_norm: bool = True,
    ):
        super().__init__()
        for name, value in (("max_frames", max_frames), ("num_mel_bins", num_mel_bins)):
            if value % PATCH_SIZE != 0:
                raise ValueError(f"{name}={value} must be a multiple of the patch size {PATCH_SIZE}")
        #: Constructor arguments (without drop_path, which holds no weights).
        self.config = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           max_frames=max_frames, num_mel_bins=num_mel_bins, final_norm=final_norm)
        self.embed_dim = embed_dim
        self.num_mel_bins = num_mel_bins
        self.grid_time = max_frames // PATCH_SIZE
        self.grid_freq = num_mel_bins // PATCH_SIZE
        self.patch_embed = nn.Conv2d(1, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # (1, 1 + grid_time * grid_freq, D); row 0 (the cls slot) is zero. A buffer, so
        # imported weights can carry their own table.
        table = sincos_pos_embed_2d(embed_dim, self.grid_time, self.grid_freq)
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, embed_dim), table]).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        self.set_drop_path(drop_path)
        self._init_weights()

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last block), as
        in timm and AudioMAE. Holds no weights: a loaded encoder can be given it afterwards."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {rate}")
        depth = len(self.blocks)
        for k, block in enumerate(self.blocks):
            block.drop_path.drop_prob = rate * k / (depth - 1) if depth > 1 else rate

    @classmethod
    def from_model_config(cls, cfg) -> "AudioEncoder":
        """Build from a ``supmam_clap`` model config (dataclass, DictConfig or plain dict)."""
        get = cfg.get if hasattr(cfg, "get") else lambda k: getattr(cfg, k)
        return cls(**{arg: get(name) for name, arg in MODEL_CONFIG_FIELDS.items()})

    def _init_weights(self) -> None:
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def grid(self, num_frames: int) -> Tuple[int, int]:
        """(time patches, freq patches) for an input of ``num_frames`` frames."""
        if num_frames % PATCH_SIZE != 0 or num_frames <= 0:
            raise ValueError(f"input has {num_frames} frames; it must be a positive multiple of {PATCH_SIZE}")
        t = num_frames // PATCH_SIZE
        if t > self.grid_time:
            raise ValueError(
                f"input has {num_frames} frames but the encoder was built for at most "
                f"{self.grid_time * PATCH_SIZE} (model.max_frames); crop or window the input"
            )
        return t, self.grid_freq

    def patch_tokens(self, source: torch.Tensor) -> torch.Tensor:
        """Embed patches and add positions.

        source: (B, 1, T, F) normalised fbank. Returns (B, t * F/16, D), time-major.
        """
        if source.dim() != 4 or source.shape[1] != 1 or source.shape[3] != self.num_mel_bins:
            raise ValueError(f"expected source of shape (B, 1, T, {self.num_mel_bins}), got {tuple(source.shape)}")
        t, f = self.grid(source.shape[2])
        x = self.patch_embed(source).flatten(2).transpose(1, 2)  # (B, t*f, D)
        pos = self.pos_embed[:, 1:].reshape(1, self.grid_time, self.grid_freq, -1)[:, :t]
        return x + pos.reshape(1, t * f, -1)

    def _prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward(
        self, source: torch.Tensor, mask_ratio: float = 0.0, mask_t_prob: float = 0.0, mask_f_prob: float = 0.0
    ) -> Tuple[torch.Tensor, Optional[Masking]]:
        """Encode, optionally keeping only a visible subset of the tokens.

        ``mask_ratio``: unstructured random masking (:func:`random_masking`);
        ``mask_t_prob`` / ``mask_f_prob``: whole time columns / frequency rows
        (:func:`time_freq_masking`). The two kinds are exclusive.

        Returns:
            x: (B, 1 + N_vis, D) normalised output, cls token first.
            masking: the :class:`Masking` used, or None without masking.
        """
        x = self.patch_tokens(source)
        masking = None
        if mask_ratio > 0 and (mask_t_prob > 0 or mask_f_prob > 0):
            raise ValueError("use either mask_ratio or mask_t_prob / mask_f_prob, not both")
        if mask_ratio > 0:
            masking = random_masking(x.shape[0], x.shape[1], mask_ratio, device=x.device)
        elif mask_t_prob > 0 or mask_f_prob > 0:
            t, f = self.grid(source.shape[2])
            masking = time_freq_masking(x.shape[0], t, f, mask_t_prob, mask_f_prob, device=x.device)
        if masking is not None:
            x = gather_tokens(x, masking.ids_keep)
        x = self._prepend_cls(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), masking

    def extract_features(self, source: torch.Tensor) -> Dict[str, List[torch.Tensor] | torch.Tensor]:
        """All tokens, no masking, with every layer's output.

        Returns a dict with
            ``layer_results``: list of depth + 1 tensors (B, 1 + N, D): the patch
                embedding (with positions and cls) followed by each block's output;
            ``x``: (B, 1 + N, D) the final normalised output.
        """
        x = self._prepend_cls(self.patch_tokens(source))
        layer_results = [x]
        for block in self.blocks:
            x = block(x)
            layer_results.append(x)
        return {"layer_results": layer_results, "x": self.norm(x)}
