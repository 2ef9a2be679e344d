"""Fused AdamW for fairseq (registered as ``mam_clap_adamw``).

fairseq's ``adam`` steps each parameter tensor in a Python loop when apex is absent,
and its ``clip_grad_norm_`` takes one norm per tensor (even at ``clip_norm: 0``, for
the logged gnorm). This optimizer wraps ``torch.optim.AdamW(fused=True)`` (CPU and
CUDA) and clips with foreach kernels. It keeps the update rule of fairseq's ``adam``
(decoupled weight decay, same config keys), so a config switches with ``_name`` alone.

Parameter groups are built here, because fairseq hands the optimizer one flat list:
no weight decay on biases and norms (``ndim <= 1``) and on parameters tagged
``weight_decay=0``; a per-group ``lr_scale`` from the tags (see :mod:`mam_clap_plugin.optim`).
:meth:`MamClapAdamW.set_lr` gives each group ``lr * lr_scale`` (fairseq's base class writes
one lr into every group).

float32 runs on a GPU with TF32 (Ampere and newer) turn TF32 matmuls on and log it
(:func:`enable_tf32_matmuls`). Mixed precision: under ``common.bf16`` and ``common.fp16``
fairseq's FP16Optimizer keeps fp32 copies and hands them here. The groups need the individual tensors, so fp16 needs
``common.fp16_no_flatten_grads=true`` (bf16 never flattens); ``common.amp`` is refused
(see :data:`AMP_DEFECT`).
"""
from __future__ import annotations

import ast
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

from . import param_groups

logger = logging.getLogger(__name__)

AMP_DEFECT = (
    "optimizer mam_clap_adamw refuses common.amp=true: fairseq 0.12's AMPOptimizer unscales the "
    "gradients twice (clip_grad_norm calls GradScaler.unscale_ on the torch optimizer, then step calls "
    "GradScaler.step on fairseq's wrapper, which the scaler tracks as another optimizer and unscales "
    "again), so the optimizer would see grad / scale^2. Use common.bf16=true instead (no loss scaling "
    "needed), or common.fp16=true with common.fp16_no_flatten_grads=true"
)

FLAT_PARAMS = (
    "optimizer mam_clap_adamw got fairseq's flattened fp16 parameters (one 1-D buffer), which hide the "
    "per-parameter groups (no weight decay on biases, norms, cls/mask tokens; lr_scale): "
    "set common.fp16_no_flatten_grads=true"
)


@dataclass
class MamClapAdamWConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas (beta1, beta2) of AdamW"})
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon of AdamW"})
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "decoupled weight decay; biases, norms and parameters tagged weight_decay=0 get none"},
    )
    amp: bool = II("common.amp")
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")
    lr: List[float] = II("optimization.lr")


def _enabled(cfg, key: str) -> bool:
    """A ``common.*`` flag as interpolated into the optimizer config (False when not resolvable)."""
    return getattr(cfg, key, False) is True


def enable_tf32_matmuls(device: torch.device) -> bool:
    """On a CUDA GPU with TF32 (compute capability >= 8), let float32 matmuls use it
    (``torch.set_float32_matmul_precision("high")``) and log it. Returns whether it did."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    logger.info("float32 run on %s: TF32 matmuls enabled (torch.set_float32_matmul_precision('high'))",
                torch.cuda.get_device_name(device))
    return True


def _is_flat_fp16_buffer(params: List[torch.Tensor]) -> bool:
    """fairseq's flattened FP16Optimizer passes a single 1-D fp32 Parameter with its grad preallocated."""
    return len(params) == 1 and params[0].ndim == 1 and params[0].grad is not None and params[0].numel() > 1


@register_optimizer("mam_clap_adamw", dataclass=MamClapAdamWConfig)
class MamClapAdamW(FairseqOptimizer):
    def __init__(self, cfg: MamClapAdamWConfig, params):
        super().__init__(cfg)
        if _enabled(cfg, "amp"):
            raise ValueError(AMP_DEFECT)
        # under common.fp16/bf16 the parameters here are fairseq's fp32 master copies, which
        # fairseq would rebuild from the half-precision model on resume: keep them in the state
        self._saves_master_params = _enabled(cfg, "fp16") or _enabled(cfg, "bf16")
        params = list(params)
        if _is_flat_fp16_buffer(params):
            raise ValueError(FLAT_PARAMS)
        if not self._saves_master_params and params:
            enable_tf32_matmuls(params[0].device)
        config = self.optimizer_config
        groups = param_groups(params, config["weight_decay"])
        # position in fairseq's flat list of each parameter, in this optimizer's state order
        self._flat_index = [i for g in groups for i in g.pop("indices")]
        for g in groups:
            g["lr"] = config["lr"] * g["lr_scale"]
        self._optimizer = torch.optim.AdamW(groups, **config, fused=True)
        self._lr = config["lr"]
        # this run's hyperparameters per group; a loaded state keeps only its moments and lr
        self._group_settings = [
            {k: v for k, v in g.items() if k not in ("params", "lr")} for g in self._optimizer.param_groups
        ]
        logger.info(
            "mam_clap_adamw (fused): %s",
            "; ".join(
                f"{len(g['params'])} tensors lr_scale={g['lr_scale']:g} weight_decay={g['weight_decay']:g}"
                for g in self._optimizer.param_groups
            ),
        )

    @property
    def optimizer_config(self):
        """The kwargs fairseq reads (and uses to override a checkpoint's optimizer args)."""
        betas = self.cfg.adam_betas
        betas = ast.literal_eval(betas) if isinstance(betas, str) else OmegaConf.to_container(betas) \
            if OmegaConf.is_config(betas) else betas
        lr = self.cfg.lr
        return {
            "lr": float(lr[0] if isinstance(lr, Collection) else lr),
            "betas": tuple(float(b) for b in betas),
            "eps": float(self.cfg.adam_eps),
            "weight_decay": float(self.cfg.weight_decay),
        }

    @property
    def supports_flat_params(self) -> bool:
        """False: the groups need the individual parameters (fairseq then asks for fp16_no_flatten_grads)."""
        return False

    def get_lr(self) -> float:
        """The scheduler's lr (before each group's lr_scale)."""
        return self._lr

    def set_lr(self, lr: float) -> None:
        """Give each group ``lr * lr_scale``."""
        self._lr = lr
        for group in self.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None) -> torch.Tensor:
        """Total L2 norm of all gradients (fp32, one foreach kernel per device and dtype); clips
        to ``max_norm`` when it is > 0, as fairseq's ``utils.clip_grad_norm_``."""
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return torch.zeros((), device=next(iter(self.params), torch.zeros(())).device)
        grads = [p.grad for p in params]
        total_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True).float()
        if aggregate_norm_fn is not None:
            total_norm = aggregate_norm_fn(total_norm)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, float(max_norm), total_norm, foreach=True)
        return total_norm

    def state_dict(self):
        """torch's AdamW state; under fp16/bf16 also the fp32 master parameters (``fp32_params``)."""
        state = self.optimizer.state_dict()
        if self._saves_master_params:
            state["fp32_params"] = [p.detach() for g in self.param_groups for p in g["params"]]
        return state

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        """Load moments, step counts and the lr from a checkpoint's optimizer state.

        Accepts this optimizer's own state and the one-group state of fairseq's ``adam``
        (moments mapped by parameter position). The hyperparameters stay this run's
        (betas, eps, weight decay, lr_scale per group); ``optimizer_overrides`` may set the lr.
        Saved fp32 master parameters replace the parameters held here (those fairseq rebuilt
        from the half-precision model), so a mixed-precision run resumes exactly.
        """
        state_dict = dict(state_dict)
        masters = state_dict.pop("fp32_params", None)
        saved = state_dict["param_groups"]
        if len(saved) == 1 and len(self.param_groups) > 1:
            state_dict = self._from_one_group(state_dict)
            saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)
        ):
            raise ValueError(
                f"the checkpoint's optimizer state has parameter groups of sizes {[len(s['params']) for s in saved]} "
                f"but this model's parameter settings give {[len(g['params']) for g in self.param_groups]} "
                "(the model or its optim_overrides changed); resume with checkpoint.reset_optimizer=true"
            )
        self.optimizer.load_state_dict(state_dict)
        if masters is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            if [m.shape for m in masters] != [p.shape for p in params]:
                raise ValueError("the checkpoint's fp32 master parameters do not match this model's parameters")
            with torch.no_grad():
                torch._foreach_copy_(params, [m.to(p.device) for m, p in zip(masters, params)])
        lr = saved[0]["lr"] / saved[0].get("lr_scale", 1.0)
        if optimizer_overrides and "lr" in optimizer_overrides:
            lr = optimizer_overrides["lr"]
        for group, settings in zip(self.param_groups, self._group_settings):
            group.update(settings)
        self.set_lr(lr)

    def _from_one_group(self, state_dict):
        """A one-group state (fairseq ``adam``: ids = positions in the flat list) in this optimizer's layout."""
        (group,) = state_dict["param_groups"]
        if len(group["params"]) != len(self._flat_index):
            raise ValueError(
                f"the checkpoint's optimizer state covers {len(group['params'])} parameters, this model has "
                f"{len(self._flat_index)}; resume with checkpoint.reset_optimizer=true"
            )
        old_ids = group["params"]
        state = {}
        for new_id, flat in enumerate(self._flat_index):
            entry = dict(state_dict["state"].get(old_ids[flat], {}))
            if "step" in entry and not torch.is_tensor(entry["step"]):
                entry["step"] = torch.tensor(float(entry["step"]))
            if entry:
                state[new_id] = entry
        groups, new_id = [], 0
        for g, settings in zip(self.param_groups, self._group_settings):
            n = len(g["params"])
            lr = group["lr"] * settings["lr_scale"]
            groups.append(dict(settings, lr=lr, params=list(range(new_id, new_id + n))))
            new_id += n
        return {"state": state, "param_groups": groups}
