"""Shim: a ``tensorboardX`` module whose ``SummaryWriter`` is torch's or a JSON-lines scalar writer."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from typing import Optional

from ._patch import set_module, stand_in_module


class JsonlSummaryWriter:
    """Minimal ``SummaryWriter``: scalars go to ``<logdir>/scalars.jsonl`` as JSON lines
    ``{"tag": ..., "value": ..., "step": ...}``; every other ``add_*`` call is ignored."""

    def __init__(self, logdir: Optional[str] = None, *args, **kwargs):
        logdir = logdir or kwargs.get("log_dir") or "runs"
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self.path = os.path.join(logdir, "scalars.jsonl")

    def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs) -> None:
        value = float(scalar_value.item() if hasattr(scalar_value, "item") else scalar_value)
        with open(self.path, "a") as f:
            f.write(json.dumps({"tag": tag, "value": value if math.isfinite(value) else str(value),
                                "step": None if global_step is None else int(global_step)}) + "\n")

    def add_scalars(self, main_tag, tag_scalar_dict, global_step=None, *args, **kwargs) -> None:
        for tag, value in tag_scalar_dict.items():
            self.add_scalar(f"{main_tag}/{tag}", value, global_step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __getattr__(self, name: str):
        if name.startswith("add_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _torch_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        return None


def shim_tensorboardx() -> bool:
    """Provide a ``tensorboardX`` module whose ``SummaryWriter`` is torch's (if the
    ``tensorboard`` package is installed) or :class:`JsonlSummaryWriter`.

    Prevents ``ModuleNotFoundError: No module named 'tensorboardX'`` at
    ``from tensorboardX import SummaryWriter`` in ``s3prl/downstream/runner.py``.
    """
    if "tensorboardX" in sys.modules or importlib.util.find_spec("tensorboardX") is not None:
        return False
    mod = stand_in_module("tensorboardX", "Stand-in for tensorboardX (see upstream.compat.shim_tensorboardx).")
    mod.SummaryWriter = _torch_summary_writer() or JsonlSummaryWriter
    set_module("tensorboardX", mod)
    return True
