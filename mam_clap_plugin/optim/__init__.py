"""Per-parameter optimizer settings and the parameter groups built from them.

A model tags a parameter with fairseq's convention::

    param.optim_overrides = {"optimizer": {"lr_scale": 0.5, "weight_decay": 0.0}}

(:func:`set_overrides` writes it; either key optional). fairseq's FP16Optimizer copies
``optim_overrides`` onto its fp32 copies when ``common.fp16_no_flatten_grads=true``.
:func:`param_groups` turns a flat parameter list into torch param groups: weight decay
0 for biases and norm weights (``ndim <= 1``) and for anything tagged
``weight_decay=0`` (cls and mask tokens), the configured decay otherwise, and an
``lr_scale`` per group that the ``mam_clap_adamw`` optimizer multiplies into the
scheduler's lr (layer-wise lr decay).

This module does not import fairseq; the registered optimizer lives in
:mod:`mam_clap_plugin.optim.mam_clap_adamw`.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch

SETTINGS = ("lr_scale", "weight_decay")


def set_overrides(param: torch.nn.Parameter, **settings: float) -> torch.nn.Parameter:
    """Tag ``param`` with optimizer settings (``lr_scale``, ``weight_decay``); returns it.

    Settings merge with earlier tags. Example: ``set_overrides(self.cls_token, weight_decay=0.0)``.
    """
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown optimizer override(s) {sorted(unknown)}; known: {list(SETTINGS)}")
    for key, value in settings.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"optimizer override {key}={value!r} must be a non-negative number")
    overrides = getattr(param, "optim_overrides", None) or {}
    overrides.setdefault("optimizer", {}).update({k: float(v) for k, v in settings.items()})
    param.optim_overrides = overrides
    return param


def param_settings(param: torch.Tensor, weight_decay: float) -> Dict[str, float]:
    """The (lr_scale, weight_decay) that :func:`param_groups` gives ``param``."""
    tags = (getattr(param, "optim_overrides", None) or {}).get("optimizer", {})
    unknown = set(tags) - set(SETTINGS)
    if unknown:
        raise ValueError(
            f"parameter of shape {tuple(param.shape)} carries unknown optim_overrides['optimizer'] "
            f"key(s) {sorted(unknown)}; known: {list(SETTINGS)}"
        )
    default_decay = 0.0 if param.ndim <= 1 else weight_decay
    return {"lr_scale": float(tags.get("lr_scale", 1.0)),
            "weight_decay": float(tags.get("weight_decay", default_decay))}


def param_groups(params: Iterable[torch.Tensor], weight_decay: float) -> List[dict]:
    """Group ``params`` by their settings, in order of first appearance.

    Returns torch param groups ``{"params", "lr_scale", "weight_decay"}``; each group also
    lists ``"indices"``, the positions of its parameters in ``params`` (removed before
    the groups reach torch; used to map a one-group state such as fairseq adam's).
    """
    groups: Dict[tuple, dict] = {}
    for i, p in enumerate(params):
        s = param_settings(p, weight_decay)
        key = (s["lr_scale"], s["weight_decay"])
        group = groups.setdefault(key, dict(params=[], indices=[], **s))
        group["params"].append(p)
        group["indices"].append(i)
    return list(groups.values())
