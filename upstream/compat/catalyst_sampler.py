"""Shim: ``catalyst.data.sampler.DistributedSamplerWrapper`` (catalyst is not a dependency)."""
from __future__ import annotations

import importlib.util
import math
import sys
from typing import List, Optional

import torch

from ._patch import set_module, stand_in_module


class DistributedSamplerWrapper(torch.utils.data.Sampler):
    """This rank's share of another sampler's indices (re-implements catalyst's wrapper).

    Each ``iter`` draws the wrapped sampler once (e.g. a ``WeightedRandomSampler``), then
    takes the positions a ``DistributedSampler`` over that draw assigns to this rank.
    """

    def __init__(self, sampler, num_replicas: Optional[int] = None, rank: Optional[int] = None, shuffle: bool = True):
        import torch.distributed as dist

        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.sampler = sampler
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.epoch = 0

    def _distributed_positions(self, n: int) -> List[int]:
        ds = torch.utils.data.DistributedSampler(
            range(n), num_replicas=self.num_replicas, rank=self.rank, shuffle=self.shuffle
        )
        ds.set_epoch(self.epoch)
        return list(iter(ds))

    def __iter__(self):
        drawn = list(iter(self.sampler))
        return iter([drawn[i] for i in self._distributed_positions(len(drawn))])

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def shim_catalyst() -> bool:
    """Provide ``catalyst.data.sampler.DistributedSamplerWrapper``.

    Prevents ``ModuleNotFoundError: No module named 'catalyst'`` at
    ``from catalyst.data.sampler import DistributedSamplerWrapper`` in
    ``s3prl/downstream/speech_commands/expert.py`` (the wrapper is used only when
    torch.distributed is initialised).
    """
    if "catalyst" in sys.modules or importlib.util.find_spec("catalyst") is not None:
        return False
    doc = "Stand-in for catalyst (see upstream.compat.shim_catalyst)."
    root, data, sampler = (stand_in_module(n, doc) for n in ("catalyst", "catalyst.data", "catalyst.data.sampler"))
    root.__path__, data.__path__ = [], []  # packages, so the submodule imports resolve
    sampler.DistributedSamplerWrapper = DistributedSamplerWrapper
    root.data, data.sampler = data, sampler
    for mod in (root, data, sampler):
        set_module(mod.__name__, mod)
    return True
