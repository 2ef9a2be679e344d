"""Shim: ``argparse.Namespace`` on torch's weights-only allow-list (s3prl's runner checkpoints)."""
from __future__ import annotations

import argparse

import torch

from ._patch import on_undo


def shim_torch_load_namespace() -> bool:
    """Allow ``argparse.Namespace`` in ``torch.load(..., weights_only=True)``.

    Prevents ``_pickle.UnpicklingError: Weights only load failed. ... WeightsUnpickler
    error: Unsupported global: GLOBAL argparse.Namespace was not an allowed global by
    default.`` when ``s3prl.run_downstream`` resumes or evaluates (``-m evaluate -e
    dev-best.ckpt``): the runner saves ``all_states['Args']`` (an ``argparse.Namespace``)
    and reloads it with a plain ``torch.load``, whose default became ``weights_only=True``
    in torch 2.6. Deliberately narrow: the weights-only loader stays on; only Namespace is
    added to its allow-list.
    """
    safe = getattr(torch.serialization, "get_safe_globals", list)()
    if argparse.Namespace in safe:
        return False
    torch.serialization.add_safe_globals([argparse.Namespace])
    on_undo(_remove_namespace)
    return True


def _remove_namespace() -> None:
    """Take ``argparse.Namespace`` off the allow-list again, keeping whatever else is on it."""
    others = [g for g in torch.serialization.get_safe_globals() if g is not argparse.Namespace]
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(others)
