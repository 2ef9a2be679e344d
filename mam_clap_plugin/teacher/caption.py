"""Caption teachers: CLAP models this project trains from captions (``examples/teacher``), as teachers.

A caption teacher's checkpoint is what ``fairseq-hydra-train --config-dir examples/teacher/config
--config-name clap`` writes: ``{"cfg": {"model": {"_name": "clap_teacher", ...}, ...}, "model":
state dict, ...}``, with the audio tower under LAION-CLAP's key names (``audio_branch.*``: the
project's HTS-AT and its front end, :class:`~mam_clap_plugin.teacher.clap.AudioBranch`;
``audio_projection.*``: Linear -> ReLU -> Linear) and the text side under ``text_branch.*``,
``text_projection.*``, ``tokenizer.model_bytes`` (the sentencepiece model) and ``logit_scale``.

:func:`load_caption_teacher` reads the audio side, strictly, into a frozen
:class:`~mam_clap_plugin.teacher.clap.ClapTeacher`: the front end (sample rate, clip length, hop,
mel range) comes from ``cfg.model``, the architecture from the tensor shapes, exactly as for a
LAION checkpoint. It imports no fairseq. :func:`load_caption_clap` builds the whole model (both
towers, for zero-shot classification and retrieval); it needs fairseq (the registered model class).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .clap import (
    ClapCheckpointError,
    ClapTeacher,
    FrontEnd,
    LaionProjection,
    _load_strict,
    build_audio_branch,
    check_layer,
    read_teacher_file,
)

#: ``cfg.model._name`` of a caption teacher checkpoint (the registered fairseq model).
MODEL_NAME = "clap_teacher"
AUDIO_PREFIX, PROJECTION_PREFIX = "audio_branch.", "audio_projection."
#: Keys of the text side: present in the checkpoint, not part of the audio teacher.
TEXT_PREFIXES = ("text_branch.", "text_projection.", "tokenizer.", "logit_scale")
#: ``cfg.model`` fields that define the front end.
FRONT_END_FIELDS = ("sample_rate", "clip_seconds", "hop_length", "fmin", "fmax")


def is_caption_checkpoint(path: str, checkpoint: Any) -> bool:
    """True for the object of a caption teacher checkpoint (``cfg.model._name == 'clap_teacher'``)."""
    cfg = checkpoint.get("cfg") if isinstance(checkpoint, dict) else None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return isinstance(model, dict) and model.get("_name") == MODEL_NAME


def front_end(path: str, model_cfg: dict) -> FrontEnd:
    """The :class:`FrontEnd` of a caption teacher's ``cfg.model`` (the filterbank is built for its own rate)."""
    missing = [k for k in FRONT_END_FIELDS if k not in model_cfg]
    if missing:
        raise ClapCheckpointError(f"{path}: cfg.model lacks the front-end fields {missing}")
    rate = int(model_cfg["sample_rate"])
    return FrontEnd(sample_rate=rate, seconds=float(model_cfg["clip_seconds"]), hop=int(model_cfg["hop_length"]),
                    fmin=float(model_cfg["fmin"]), fmax=float(model_cfg["fmax"]), filterbank_rate=rate)


def _model_state(path: str, checkpoint: Any) -> tuple[dict, dict[str, Tensor]]:
    if not is_caption_checkpoint(path, checkpoint) or not isinstance(checkpoint.get("model"), dict):
        raise ClapCheckpointError(f"{path}: not a caption teacher checkpoint (cfg.model._name {MODEL_NAME!r} "
                                  "and a 'model' state dict)")
    return checkpoint["cfg"]["model"], checkpoint["model"]


def load_caption_teacher(path: str, layer: str = "final", projection: bool = False, *, trusted: bool = False,
                         checkpoint: Any = None) -> ClapTeacher:
    """A frozen :class:`ClapTeacher` from a caption teacher checkpoint (its audio tower).

    ``layer="final"`` gives HTS-AT's final map (2 x 32 x C for the configs' sizes), optionally
    through ``audio_projection`` per token (``projection=True``); ``stage3`` needs 4 stages.
    Every ``audio_branch.*`` key must match the tower the shapes describe (and every
    ``audio_projection.*`` key the projection, when asked for); a key outside the audio and
    text sides is an error too. Raises :class:`ClapCheckpointError` naming the file.
    """
    check_layer(layer, projection)
    if checkpoint is None:
        checkpoint = read_teacher_file(path, trusted, what="caption teacher checkpoint")
    model_cfg, state = _model_state(path, checkpoint)
    stray = sorted(k for k in state if not k.startswith((AUDIO_PREFIX, PROJECTION_PREFIX, *TEXT_PREFIXES)))
    if stray:
        raise ClapCheckpointError(f"{path}: unexpected keys in a caption teacher checkpoint: {', '.join(stray[:20])}")
    fe = front_end(path, model_cfg)
    audio = {k[len(AUDIO_PREFIX):]: v for k, v in state.items() if k.startswith(AUDIO_PREFIX)}
    branch, arch = build_audio_branch(path, audio, fe, layer, f"its '{AUDIO_PREFIX}*' tower")
    proj = None
    if projection:
        proj_state = {k[len(PROJECTION_PREFIX):]: v for k, v in state.items() if k.startswith(PROJECTION_PREFIX)}
        if "2.weight" not in proj_state:
            raise ClapCheckpointError(f"{path}: no '{PROJECTION_PREFIX}2.weight' for projection=True")
        proj = LaionProjection(branch.num_features, proj_state["2.weight"].shape[0])
        _load_strict(path, proj, proj_state, f"its '{PROJECTION_PREFIX}*' projection")
    return ClapTeacher(branch, proj, name=f"caption-clap-htsat-{arch.size}", layout="caption", layer=layer,
                       front_end=fe)


def load_caption_clap(path: str, trusted: bool = False, checkpoint: Any = None):
    """The whole caption CLAP model (``mam_clap_plugin.models.clap_teacher.ClapTeacherModel``, both
    towers and the tokenizer), built from the checkpoint's ``cfg.model`` and loaded strictly, in
    eval mode. Needs fairseq. Raises :class:`ClapCheckpointError` for any other file (``checkpoint``:
    the file's object when already read)."""
    from ..models.clap_teacher import ClapTeacherModel

    if checkpoint is None:
        checkpoint = read_teacher_file(path, trusted, what="caption teacher checkpoint")
    model_cfg, state = _model_state(path, checkpoint)
    model = ClapTeacherModel.from_config_dict(model_cfg, tokenizer=state.get("tokenizer.model_bytes"))
    _load_strict(path, model, dict(state), "the caption CLAP model")
    return model.eval()
