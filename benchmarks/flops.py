"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode``, CPU attention included."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch

# torch's FlopCounterMode has formulas for the CUDA SDPA kernels but not for the CPU flash
# kernel that F.scaled_dot_product_attention picks on CPU, which would count attention as
# 0 FLOPs. These mirror torch's sdpa_flop_count / sdpa_backward_flop_count.


def _sdpa_fwd_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = q
    sk, dv = k[2], v[3]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


def _sdpa_bwd_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = q
    sk, dv = k[2], v[3]
    # recompute scores, grad scores, grad V, grad Q, grad K
    return 2 * b * h * (sq * sk * d + sq * sk * dv + sk * sq * dv + sq * sk * d + d * sq * sk)


def cpu_sdpa_flop_mapping() -> Dict[Any, Callable]:
    aten = torch.ops.aten
    mapping = {}
    for op_name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_fwd_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_bwd_flops),
    ):
        if hasattr(aten, op_name):
            mapping[getattr(aten, op_name)] = fn
    return mapping


def flops_by_module(counts: Dict[str, Dict[Any, int]]) -> Dict[str, float]:
    """GFLOP per direct child of the model (encoder, decoder, head, classifier).

    ``counts`` is a snapshot of ``FlopCounterMode.get_flop_counts()`` taken after the
    forward pass: the module attribution of backward ops is not reliable (gradients that
    flow through shared inputs get credited to whichever module hook ran last).
    """
    out = {}
    for name, ops in counts.items():
        parts = name.split(".")
        if len(parts) == 2:
            out[parts[1]] = sum(ops.values()) / 1e9
    return out
