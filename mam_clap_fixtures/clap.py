"""Randomly initialised CLAP checkpoints in the real LAION-CLAP and MS-CLAP 2023 layouts, and
untrained caption teachers in the layout ``examples/teacher`` training writes.

:func:`save_random_clap_checkpoint` writes what :func:`mam_clap_plugin.teacher.load_clap_teacher`
reads: the real audio key names and shapes of HTSAT-``size`` (or a small test geometry), the
real front end (Hann-windowed DFT rows, the layout's Slaney mel filterbank, valid BatchNorm
statistics), the HTS-AT tagging head and a few text-branch tensors. Deterministic for a seed.
:func:`save_random_caption_teacher` writes a ``clap_teacher`` model at initialisation.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from mam_clap_plugin.teacher.clap import (
    HEADS,
    LAYOUTS,
    SIZES,
    Architecture,
    AudioBranch,
    FrontEnd,
    dft_weights,
    mel_filterbank,
)

__all__ = ["dft_weights", "random_audio_state", "save_random_caption_teacher", "save_random_clap_checkpoint"]

#: Classes of the HTS-AT AudioSet tagging head (``tscam_conv``, ``head``) the checkpoints carry.
NUM_CLASSES = 527
_FRONT_END_KEYS = ("spectrogram_extractor.", "logmel_extractor.", "bn0.")


def random_audio_state(arch: Architecture, fe: FrontEnd, gen: torch.Generator) -> dict[str, Tensor]:
    """State dict of a randomly initialised AudioBranch plus the tagging head, real front end."""
    branch = AudioBranch(arch.embed_dim, arch.depths, arch.num_heads, arch.window, arch.patch_size,
                         arch.n_fft, fe.hop, arch.mel_bins)
    state = branch.state_dict()

    def randn(shape, std):
        return torch.randn(shape, generator=gen) * std

    for k, v in state.items():
        if not v.is_floating_point() or k.endswith("attn_mask") or k.startswith(_FRONT_END_KEYS):
            continue  # index buffers, shift masks and the front end (below) are not random
        if k.endswith("relative_position_bias_table"):
            state[k] = randn(v.shape, 0.5)  # large enough that the bias visibly shapes the attention
        elif v.dim() == 1 and "norm" in k:  # LayerNorm
            state[k] = (1.0 + randn(v.shape, 0.1)) if k.endswith("weight") else randn(v.shape, 0.05)
        elif k.endswith("bias"):
            state[k] = randn(v.shape, 0.02)
        else:  # Linear / Conv weights, unit-variance outputs
            state[k] = randn(v.shape, v[0].numel() ** -0.5)
    real, imag = dft_weights(arch.n_fft)
    state["spectrogram_extractor.stft.conv_real.weight"] = real
    state["spectrogram_extractor.stft.conv_imag.weight"] = imag
    state["logmel_extractor.melW"] = mel_filterbank(fe.filterbank_rate, arch.n_fft, arch.mel_bins, fe.fmin, fe.fmax)
    M = arch.mel_bins
    state["bn0.weight"] = 1.0 + randn(M, 0.1)
    state["bn0.bias"] = randn(M, 0.1)
    state["bn0.running_mean"] = -20.0 + randn(M, 5.0)
    state["bn0.running_var"] = 100.0 + 50.0 * torch.rand(M, generator=gen)
    state["bn0.num_batches_tracked"] = torch.tensor(100000, dtype=torch.long)
    C = branch.num_features
    freq_cells = branch.stage_shape(len(arch.depths) - 1)[0]
    state["tscam_conv.weight"] = randn((NUM_CLASSES, C, freq_cells, 3), 0.01)
    state["tscam_conv.bias"] = torch.zeros(NUM_CLASSES)
    state["head.weight"] = randn((NUM_CLASSES, NUM_CLASSES), 0.01)
    state["head.bias"] = torch.zeros(NUM_CLASSES)
    return state


def save_random_clap_checkpoint(path: str, layout: str = "laion", size: str = "tiny", seed: int = 0, *,
                                embed_dim: int | None = None, depths=None, num_heads=None) -> str:
    """Write a randomly initialised CLAP checkpoint in the real ``layout`` ("laion" | "msclap").

    Audio keys and shapes are those of the real HTSAT-``size`` ("tiny" | "base"; embed_dim,
    depths, num_heads override them for small test teachers), with the real STFT and mel weights
    and valid BatchNorm statistics; a few small text-branch tensors stand in for the text tower.
    Returns ``path``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    embed, size_depths = SIZES[size]
    arch = Architecture(embed_dim=embed_dim or embed, depths=tuple(depths or size_depths),
                        num_heads=tuple(num_heads or HEADS), window=8, patch_size=4, n_fft=1024, mel_bins=64)
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    state = {lay.audio_prefix + k: v for k, v in random_audio_state(arch, lay.front_end, gen).items()}
    C = arch.embed_dim << (len(arch.depths) - 1)

    def normal(*shape, std=0.02, mean=0.0):
        return mean + std * torch.randn(shape, generator=gen)

    if layout == "laion":
        state.update({
            "audio_projection.0.weight": normal(512, C, std=C ** -0.5), "audio_projection.0.bias": normal(512),
            "audio_projection.2.weight": normal(512, 512, std=512 ** -0.5), "audio_projection.2.bias": normal(512),
            "audio_transform.sequential.0.weight": normal(512, 512), "audio_transform.sequential.0.bias": normal(512),
            "audio_transform.sequential.3.weight": normal(512, 512), "audio_transform.sequential.3.bias": normal(512),
            "text_branch.embeddings.word_embeddings.weight": normal(16, 768),
            "text_branch.embeddings.position_embeddings.weight": normal(16, 768),
            "text_branch.encoder.layer.0.attention.self.query.weight": normal(768, 768),
            "text_branch.pooler.dense.weight": normal(768, 768),
            "text_transform.sequential.0.weight": normal(512, 512), "text_transform.sequential.0.bias": normal(512),
            "text_projection.0.weight": normal(512, 768), "text_projection.0.bias": normal(512),
            "text_projection.2.weight": normal(512, 512), "text_projection.2.bias": normal(512),
            "logit_scale_a": torch.tensor(math.log(1 / 0.07)), "logit_scale_t": torch.tensor(math.log(1 / 0.07)),
        })
        ckpt = {"epoch": 0, "name": f"random-htsat-{size}-seed{seed}",
                "state_dict": {"module." + k: v for k, v in state.items()}}
    else:
        state.update({
            "audio_encoder.projection.linear1.weight": normal(1024, C, std=C ** -0.5),
            "audio_encoder.projection.linear2.weight": normal(1024, 1024, std=1024 ** -0.5),
            "audio_encoder.projection.layer_norm.weight": normal(1024, std=0.1, mean=1.0),
            "audio_encoder.projection.layer_norm.bias": normal(1024),
            "caption_encoder.base.wte.weight": normal(16, 768),
            "caption_encoder.base.wpe.weight": normal(16, 768),
            "caption_encoder.base.h.0.attn.c_attn.weight": normal(768, 2304),
            "caption_encoder.base.ln_f.weight": normal(768, mean=1.0),
            "caption_encoder.projection.linear1.weight": normal(1024, 768),
            "caption_encoder.projection.linear2.weight": normal(1024, 1024),
            "caption_encoder.projection.layer_norm.weight": normal(1024, mean=1.0),
            "caption_encoder.projection.layer_norm.bias": normal(1024),
            "logit_scale": torch.tensor(math.log(1 / 0.07)),
        })
        ckpt = {"model": state}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path)
    return path


def save_random_caption_teacher(path: str, model_cfg: dict, tokenizer: bytes, seed: int = 0) -> str:
    """Write an untrained caption teacher (model ``clap_teacher``, initialised as training starts it,
    under ``torch.manual_seed(seed)``) in the layout fairseq's trainer saves: ``{"cfg": {"model":
    ...}, "model": state dict}``, which :func:`mam_clap_plugin.teacher.load_teacher` reads as a
    caption teacher. ``model_cfg``: ``model.*`` settings (e.g. the composed config's); the
    vocabulary size comes from ``tokenizer`` (a sentencepiece model's bytes). Needs fairseq."""
    import dataclasses

    import sentencepiece

    from mam_clap_plugin.models.clap_teacher import ClapTeacherModel

    cfg = {**model_cfg, "vocab_size": sentencepiece.SentencePieceProcessor(model_proto=tokenizer).get_piece_size()}
    torch.manual_seed(seed)
    model = ClapTeacherModel.from_config_dict(cfg, tokenizer)
    saved = {**dataclasses.asdict(model.cfg), "_name": "clap_teacher"}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"cfg": {"model": saved}, "model": model.state_dict()}, path)
    return path
