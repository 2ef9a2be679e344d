"""Pieces that keep fairseq's mixed precision (``common.fp16`` / ``common.bf16``) exact where it must be.

fairseq casts the whole model with ``model.half()`` / ``model.to(torch.bfloat16)`` and every
float32 tensor of each batch to the same dtype. :class:`Fp32BatchNorm1d` keeps its statistics
and affine parameters in float32 through that cast; :func:`carry_exact` / :func:`exact` carry a
float32 tensor (the online teacher's waveform) past the batch cast bit for bit.
:func:`ieee_fp32` keeps the front end's float32 matmuls and convolutions out of TF32 on GPUs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class KeepsFloat32(nn.Module):
    """Mixin: the module's own parameters and buffers stay float32 whatever ``.to()``, ``.half()``
    or fairseq's fp16/bf16 cast asks (a norm layer's statistics overflow or lose precision in
    half precision)."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for t in (*self.parameters(recurse=False), *self.buffers(recurse=False)):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self


class Fp32BatchNorm1d(KeepsFloat32, nn.BatchNorm1d):
    """BatchNorm1d whose running statistics and affine parameters stay float32 whatever the model's
    dtype; it normalises in float32 and returns the input's dtype.

    A training batch of one clip (the last batch of an epoch on some process, or what skipping
    left) has one value per channel: its batch variance is 0, so batch statistics would map
    every input to the bias (PyTorch refuses it: "Expected more than 1 value per channel").
    Such a batch is normalised with the running statistics instead, as in evaluation, and
    leaves them unchanged: the clip still trains the branch (gradients flow through the
    affine and the input), and the statistics only ever average batches of two or more.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            if self.training and self.track_running_stats and x.numel() == x.shape[1]:  # one value per channel
                y = nn.functional.batch_norm(x.float(), self.running_mean, self.running_var, self.weight, self.bias,
                                             False, 0.0, self.eps)
                return y.to(x.dtype)
            return super().forward(x.float()).to(x.dtype)


def carry_exact(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor as its int32 bit pattern: fairseq's fp16/bf16 batch cast (float32 tensors
    only) and its device copy leave it as is. :func:`exact` restores it."""
    if t.dtype != torch.float32:
        raise TypeError(f"carry_exact expects float32, got {t.dtype}")
    return t.view(torch.int32)


def exact(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`carry_exact` (a float32 tensor passes through)."""
    return t.view(torch.float32) if t.dtype == torch.int32 else t


@contextlib.contextmanager
def ieee_fp32(device: torch.device):
    """Full float32 matmuls and convolutions on CUDA inside the block, the previous settings
    restored after it. TF32 (cuDNN's default for float32 convolutions; the plugin's choice for
    matmuls in float32 runs) rounds inputs to 10 mantissa bits: the resampler's convolution and
    the fbank's mel projection must give the CPU's values (within 1e-4). Elsewhere a no-op."""
    if device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        conv = conv.conv
        saved = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:
        saved = matmul.allow_tf32, conv.allow_tf32
        matmul.allow_tf32 = conv.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32, conv.allow_tf32 = saved
