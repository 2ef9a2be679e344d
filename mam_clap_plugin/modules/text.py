"""The text side of a caption-trained CLAP teacher: a sentencepiece tokenizer held as a module, and a
small transformer over its ids.

* :class:`SentencePieceTokenizer`: the ``.model`` file's bytes in a uint8 buffer (``model_bytes``),
  so a checkpoint's state dict carries its tokenizer, and captions -> padded ids + mask;
* :class:`TextTower`: token + learned position embeddings, pre-norm :class:`~.transformer.Block` s
  (padding masked out of the attention), a final LayerNorm and the mean over the caption's tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..optim import set_overrides
from .transformer import Block


class SentencePieceTokenizer(nn.Module):
    """A sentencepiece model as a module: its serialised bytes are the buffer ``model_bytes``.

    Loading a state dict takes the saved model whatever its size (the buffer is resized first),
    so a model built without a tokenizer (rebuilt from a checkpoint) gets the checkpoint's.
    Captions are encoded on the host: ``[bos] pieces [eos]`` (each special id only if the model
    defines it), cut to ``max_tokens``.
    """

    def __init__(self, model_bytes: bytes | torch.Tensor | None = None):
        super().__init__()
        if isinstance(model_bytes, torch.Tensor):
            data = model_bytes.detach().to("cpu", torch.uint8).clone()
        elif model_bytes:
            data = torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8).clone()
        else:
            data = torch.zeros(0, dtype=torch.uint8)
        self.register_buffer("model_bytes", data)
        self._processor = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "model_bytes")
        if saved is not None and saved.shape != self.model_bytes.shape:
            self.model_bytes = torch.empty_like(saved, device=self.model_bytes.device)
        self._processor = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def serialized(self) -> bytes:
        """The sentencepiece ``.model`` file's bytes."""
        return self.model_bytes.cpu().numpy().tobytes()

    @property
    def processor(self):
        """The ``sentencepiece.SentencePieceProcessor`` of :attr:`model_bytes` (built once)."""
        if self._processor is None:
            import sentencepiece

            if self.model_bytes.numel() == 0:
                raise RuntimeError("this tokenizer holds no sentencepiece model")
            self._processor = sentencepiece.SentencePieceProcessor(model_proto=self.serialized())
        return self._processor

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, captions: Sequence[str], max_tokens: int) -> list[list[int]]:
        """Each caption's ids: ``[bos] pieces [eos]`` with at most ``max_tokens`` in all (one
        sentencepiece call for the batch)."""
        sp = self.processor
        bos, eos = sp.bos_id(), sp.eos_id()
        room = max(max_tokens - (bos >= 0) - (eos >= 0), 0)
        return [[bos] * (bos >= 0) + pieces[:room] + [eos] * (eos >= 0) for pieces in sp.encode(list(captions))]

    def ids(self, caption: str, max_tokens: int) -> list[int]:
        """One caption's ids: ``[bos] pieces [eos]`` with at most ``max_tokens`` in all."""
        return self.encode([caption], max_tokens)[0]

    def forward(self, captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (ids (B, L) long, valid (B, L) bool), padded with id 0 to the longest (L <= max_tokens)."""
        rows = self.encode(captions, max_tokens)
        length = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        valid = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            valid[i, : len(row)] = True
        return ids, valid

    def __getstate__(self):  # the processor is rebuilt from the bytes
        state = dict(self.__dict__)
        state["_processor"] = None
        return state

    def extra_repr(self) -> str:
        return f"{self.model_bytes.numel()} bytes"


class TextTower(nn.Module):
    """Transformer over token ids: (B, L) ids + (B, L) valid mask -> (B, dim) caption features.

    Args:
        vocab_size: tokenizer vocabulary.
        dim: width D.
        depth: number of blocks.
        num_heads: attention heads.
        max_tokens: longest caption in tokens (size of the position table).
        mlp_ratio: MLP hidden width / D.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, max_tokens: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.max_tokens = max_tokens
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        set_overrides(self.pos_embed, weight_decay=0.0)
        set_overrides(self.token_embed.weight, weight_decay=0.0)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids (B, L) long, valid (B, L) bool (at least one True per row) -> (B, D): the mean of the
        final-normed features over each caption's valid tokens."""
        L = ids.shape[1]
        if L > self.max_tokens:
            raise ValueError(f"{L} tokens exceed the position table ({self.max_tokens})")
        x = self.token_embed(ids) + self.pos_embed[:, :L]
        attn_mask = valid[:, None, None, :]  # keys: True = may attend
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.norm(x)
        w = valid.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
