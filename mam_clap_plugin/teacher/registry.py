"""Which loader reads a teacher checkpoint: an ordered list of formats, each a ``detect`` and a ``load``.

:func:`load_teacher` reads the file once (``torch.load(weights_only=True)``, numpy scalars allowed;
``trusted=True`` unpickles it fully), asks each format in order whether the file is its kind and
builds the teacher with the first that says yes; the teacher is checked against the contract of
:mod:`mam_clap_plugin.teacher.base`. A file that no format recognises is refused with one error
listing what each format expects. Extraction (``examples/prepare/extract_clap_targets.py``), the
online teacher (``task.teacher_checkpoint``) and the target store's header all build their teacher
here.

Formats, in the order they are asked:

1. ``caption-clap``: a CLAP teacher trained from captions with ``examples/teacher``
   (:mod:`mam_clap_plugin.teacher.caption`);
2. ``laion-clap/ms-clap``: LAION-CLAP (HTS-AT, non-fusion) or MS-CLAP 2023
   (:func:`mam_clap_plugin.teacher.clap.load_clap_teacher`).

Adding a teacher is one file with its module and loader, plus one :func:`register_teacher_format`
call here (or in the new file, imported by this package's ``__init__``)::

    register_teacher_format(TeacherFormat(
        name="my-teacher",
        expects="a dict with 'my_model' weights",
        detect=lambda path, ckpt: isinstance(ckpt, dict) and "my_model" in ckpt,
        load=load_my_teacher,  # load_my_teacher(path, *, checkpoint, layer, projection) -> a Teacher
    ))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .base import Teacher, check_teacher
from .caption import is_caption_checkpoint, load_caption_teacher
from .clap import ClapCheckpointError, check_layer, clap_layouts, clap_state_dict, load_clap_teacher, read_teacher_file


@dataclass(frozen=True)
class TeacherFormat:
    """One kind of teacher checkpoint.

    Attributes:
        name: short name, shown in errors and logs.
        expects: what a file of this kind holds, for the error that lists every format.
        detect: ``detect(path, checkpoint) -> bool`` on the object the file holds.
        load: ``load(path, *, checkpoint, layer, projection) -> Teacher``; raises
            :class:`~mam_clap_plugin.teacher.clap.ClapCheckpointError` naming the file.
    """

    name: str
    expects: str
    detect: Callable[[str, Any], bool]
    load: Callable[..., Teacher]


def _is_clap(path: str, checkpoint: Any) -> bool:
    state = clap_state_dict(checkpoint)
    return bool(state) and bool(clap_layouts(state))


#: The formats :func:`load_teacher` asks, in order (the first that detects the file loads it).
TEACHER_FORMATS: list[TeacherFormat] = [
    TeacherFormat("caption-clap", "a caption teacher trained with examples/teacher (a fairseq checkpoint whose "
                  "cfg.model._name is 'clap_teacher', audio tower under 'audio_branch.*')",
                  is_caption_checkpoint, load_caption_teacher),
    TeacherFormat("laion-clap/ms-clap", "LAION-CLAP (a state dict, under 'state_dict' or bare, with "
                  "'audio_branch.*' keys, 'module.' optional) or MS-CLAP 2023 ('model' with "
                  "'audio_encoder.base.htsat.*' keys)", _is_clap, load_clap_teacher),
]


def register_teacher_format(fmt: TeacherFormat, first: bool = False) -> None:
    """Add ``fmt`` to :data:`TEACHER_FORMATS` (last, or ``first``); a format of the same name is replaced."""
    TEACHER_FORMATS[:] = [f for f in TEACHER_FORMATS if f.name != fmt.name]
    TEACHER_FORMATS.insert(0 if first else len(TEACHER_FORMATS), fmt)


def detect_format(path: str, checkpoint: Any) -> TeacherFormat | None:
    """The first format that recognises ``checkpoint`` (the object the file ``path`` holds), or None."""
    return next((f for f in TEACHER_FORMATS if f.detect(path, checkpoint)), None)


def load_teacher(path: str, layer: str = "final", projection: bool = False, *, trusted: bool = False) -> Teacher:
    """The frozen teacher in the checkpoint file ``path``, from the first format that recognises it.

    Raises ValueError for a bad ``layer`` / ``projection`` pair and
    :class:`~mam_clap_plugin.teacher.clap.ClapCheckpointError` naming the file when it is missing,
    unreadable, refused by the weights-only loader (pass ``trusted=True`` for a file you trust),
    of no known format (the message lists each format's expectation) or inconsistent.
    """
    check_layer(layer, projection)
    checkpoint = read_teacher_file(path, trusted, what="teacher checkpoint")
    fmt = detect_format(path, checkpoint)
    if fmt is None:
        kind = type(checkpoint).__name__
        keys = sorted(k for k in checkpoint if isinstance(k, str))[:6] if isinstance(checkpoint, dict) else []
        raise ClapCheckpointError(
            f"{path}: no teacher format recognises this file (a {kind}{' with keys ' + ', '.join(keys) if keys else ''}"
            "); the formats expect: " + "; ".join(f"{f.name}: {f.expects}" for f in TEACHER_FORMATS))
    teacher = fmt.load(path, checkpoint=checkpoint, layer=layer, projection=projection)
    return check_teacher(teacher, f"{path} ({fmt.name})")
