"""The teacher contract: what target extraction, the target store and the online teacher rely on.

A teacher is a frozen ``torch.nn.Module`` that maps a batch of waveforms to token maps::

    wav (B, num_samples) float32 at sample_rate  ->  (B, grid_freq, grid_time, dim) float32

and describes that map well enough to align it with the student's patches
(:mod:`mam_clap_plugin.data.alignment`) and to record it in a target store's header
(:meth:`mam_clap_plugin.data.target_store.TargetStoreHeader.for_teacher`):

* ``name``: the teacher and its size (``laion-clap-htsat-tiny``, ``caption-clap-htsat-...``);
* ``layer`` (``final`` | ``stage3``) and ``projection`` (the CLAP audio projection applied per
  token): which map, as the extraction script and ``task.teacher_layer`` /
  ``task.teacher_projection`` name it;
* ``grid`` = (grid_freq, grid_time) and ``dim``: the map's shape;
* ``sample_rate``, ``seconds`` and ``num_samples = round(seconds * sample_rate)``: its input, the
  first ``seconds`` of a clip (zero-padded at the end); the ``grid_time`` cells split those
  seconds into equal parts;
* ``freq_edges_hz()``: ``grid_freq + 1`` ascending band edges in Hz of the input audio
  (frequency cell 0 is the lowest band);
* ``autocast_dtype``: None (float32) or the dtype its transformer may run in under autocast;
  whatever it is, the map comes back float32.

It is always in eval mode (``train()`` changes nothing) and nothing in it requires a gradient.

A teacher format is one loader plus one entry in :mod:`mam_clap_plugin.teacher.registry`:
``detect(path, checkpoint)`` says whether a file is its kind, ``load(path, checkpoint=...,
layer=..., projection=...)`` builds the teacher. :func:`check_teacher` checks what a loader
returns against this contract.
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

#: The maps a teacher may offer (``final``: after the last stage and norm; ``stage3``: HTS-AT's third stage).
LAYERS = ("final", "stage3")


@runtime_checkable
class Teacher(Protocol):
    """What a teacher provides (see the module docstring); implementations are ``nn.Module`` s,
    e.g. :class:`mam_clap_plugin.teacher.clap.ClapTeacher`."""

    name: str
    layer: str
    projection: bool
    grid: tuple[int, int]
    dim: int
    sample_rate: int
    seconds: float
    num_samples: int
    autocast_dtype: torch.dtype | None

    def freq_edges_hz(self) -> list[float]:
        """``grid_freq + 1`` ascending band edges in Hz."""

    def __call__(self, wav: Tensor) -> Tensor:
        """(B, num_samples) float32 -> (B, grid_freq, grid_time, dim) float32."""

    def to(self, *args, **kwargs) -> "Teacher":
        """Move to a device (``nn.Module.to``)."""

    def parameters(self, recurse: bool = True):
        """Its (frozen) parameters (``nn.Module.parameters``)."""


def check_teacher(teacher, where: str) -> Teacher:
    """Return ``teacher`` if it keeps the contract; else raise TypeError naming ``where`` and what is wrong."""
    if not isinstance(teacher, torch.nn.Module) or not isinstance(teacher, Teacher):
        missing = [n for n in ("name", "layer", "projection", "grid", "dim", "sample_rate", "seconds", "num_samples",
                               "autocast_dtype", "freq_edges_hz") if not hasattr(teacher, n)]
        raise TypeError(f"{where}: the loader returned a {type(teacher).__name__}, not a teacher module"
                        + (f" (missing {', '.join(missing)})" if missing else ""))
    problems = []
    grid = teacher.grid
    if not (isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)):
        problems.append(f"grid {grid!r} is not (grid_freq, grid_time) of positive ints")
    for name in ("dim", "sample_rate", "num_samples"):
        value = getattr(teacher, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} {value!r} is not a positive int")
    if teacher.layer not in LAYERS:
        problems.append(f"layer {teacher.layer!r} is not one of {LAYERS}")
    if not problems and teacher.num_samples != round(teacher.seconds * teacher.sample_rate):
        problems.append(f"num_samples {teacher.num_samples} != round(seconds {teacher.seconds} x sample_rate "
                        f"{teacher.sample_rate})")
    if not problems:
        edges = teacher.freq_edges_hz()
        if (len(edges) != grid[0] + 1 or not all(math.isfinite(e) for e in edges)
                or any(b <= a for a, b in zip(edges, edges[1:]))):
            problems.append(f"freq_edges_hz() {edges!r} are not grid_freq + 1 = {grid[0] + 1} ascending frequencies")
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        problems.append("it is not frozen (eval mode, no parameter requiring a gradient)")
    if problems:
        raise TypeError(f"{where}: the teacher breaks the contract: {'; '.join(problems)}")
    return teacher
