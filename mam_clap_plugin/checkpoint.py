"""Every loader of this project's encoder files, on torch >= 2.6 (``torch.load`` defaults
to ``weights_only=True``).

Files :func:`load_encoder` / :func:`load_encoder_with_stats` read (nothing here imports
fairseq or s3prl):

* an **encoder export** (``examples/export_encoder.py``): ``ENCODER.safetensors`` holding the
  weights, with the JSON config (:func:`export_config`) in its header metadata under
  ``"mam_clap_config"`` and the same JSON written next to it as ``ENCODER.json``. The older
  torch export (``.pt``, version 1) stays readable and is still written for a ``.pt`` name;
* a **Hugging Face folder** (``examples/export_encoder.py CKPT OUT --hub``,
  :class:`mam_clap_plugin.hub.MamClapEncoder`): ``config.json`` holding the same JSON config
  and ``model.safetensors`` holding the same weights (with the config in its metadata too,
  so the file alone is an encoder export); the two must agree;
* a converted AudioMAE file (``examples/convert/audiomae_to_mam_clap.py``): an encoder
  export whose config names the AudioMAE source, and which keeps a fine-tuned file's
  ``fc_norm.*`` / ``head.*`` weights (``config["head"]``);
* a fairseq **pretraining** checkpoint of this plugin (model ``supmam_clap``): the encoder
  is ``model["encoder.*"]``, built from ``cfg.model``;
* a fairseq **fine-tuning** checkpoint (model ``mam_clap_classifier``): the encoder is
  ``model["encoder.*"]`` too; its architecture is read from the weights' shapes, the head
  count from ``cfg.model.encoder_attention_heads`` (or ``num_heads``).

The choice of ``weights_only=True`` is deliberate: checkpoints written by this plugin's
fairseq runs hold only tensors and plain containers (fairseq stores the config as a dict),
so no code from the file is ever executed. A file that needs more (an older fairseq
checkpoint whose ``args`` is an ``argparse.Namespace``, say) is refused with a clear error;
pass ``trusted=True`` only for files you trust, which loads them with ``weights_only=False``.
Safetensors files hold no code at all.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, NamedTuple, Optional

import torch

from .data.audio import FBANK_OPTIONS, NUM_MEL_BINS, SAMPLE_RATE, resolve_norm_stats
from .files import (
    CheckpointError,
    atomic_write,
    file_sha256,
    is_safetensors,
    read_safetensors,
    read_torch_file,
    torch_save,
)
from .modules.encoder import MODEL_CONFIG_FIELDS, PATCH_SIZE, AudioEncoder

#: ``format`` entry of an encoder export.
EXPORT_FORMAT = "mam_clap_encoder"
#: Version of the safetensors export (:func:`save_encoder` with a ``.safetensors`` name).
EXPORT_VERSION = 2
#: Version of the older torch export (``.pt``), still read and written.
TORCH_EXPORT_VERSION = 1
#: Header-metadata key of a safetensors export that holds its JSON config.
CONFIG_KEY = "mam_clap_config"
#: fairseq model names whose checkpoints hold the encoder under ``encoder.``.
PRETRAINING_MODEL = "supmam_clap"
FINETUNING_MODEL = "mam_clap_classifier"
#: Default of the pretraining task's ``norm_stats`` (used when a checkpoint lacks it).
DEFAULT_NORM_STATS = "audioset"
#: What an export's front end applies to the fbank.
NORMALISATION = "(fbank - mean) / (2 * std)"
#: The two files of a Hugging Face folder (huggingface_hub's CONFIG_NAME and SAFETENSORS_SINGLE_FILE).
HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"


def export_state(config: Any, tensors: Dict[str, torch.Tensor], where: str) -> Dict[str, Any]:
    """``{"format", "version", "config", "model"}`` of a JSON config read from ``where``, checked:
    an object of this project's format and a known version, with ``encoder`` and ``frontend``."""
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{where}: format {found!r}, expected '{EXPORT_FORMAT}': not the config of an "
                              "encoder of this project")
    state = {"format": config["format"], "version": config.get("version"), "config": config, "model": tensors}
    _export_version(state, where)
    missing = [k for k in ("encoder", "frontend") if not isinstance(config.get(k), dict)]
    if missing:
        raise CheckpointError(f"{where}: the config has no {missing} object")
    return state


def _embedded_config(meta: Dict[str, str], path: str) -> Any:
    """The JSON config in a safetensors file's header metadata (``"mam_clap_config"``), parsed."""
    try:
        return json.loads(meta[CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: '{CONFIG_KEY}' metadata is not valid JSON ({err})") from err


def _read_export(path: str) -> Dict[str, Any]:
    """A safetensors export as ``{"format", "version", "config", "model"}`` (``config``: see
    :func:`export_config`)."""
    tensors, meta = read_safetensors(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(
            f"{path}: a safetensors file without a '{CONFIG_KEY}' config, so not an encoder export of this "
            "project; an AudioMAE or timm file is converted with examples/convert/audiomae_to_mam_clap.py")
    return export_state(_embedded_config(meta, path), tensors, path)


def is_hub_folder(path: str) -> bool:
    """True for a folder (a Hugging Face folder is the only folder :func:`load_checkpoint` reads)."""
    return os.path.isdir(path)


def _read_hub_folder(path: str) -> Dict[str, Any]:
    """A Hugging Face folder (``config.json`` + ``model.safetensors``) as an export's state, plus
    ``config_path`` and ``weights_path`` (named by later errors)."""
    config_path, weights_path = os.path.join(path, HUB_CONFIG), os.path.join(path, HUB_WEIGHTS)
    for name in (HUB_CONFIG, HUB_WEIGHTS):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(
                f"{os.path.join(path, name)}: not found; a folder is read as a Hugging Face folder of this project, "
                f"which holds {HUB_CONFIG} and {HUB_WEIGHTS} (examples/export_encoder.py CKPT OUT --hub)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
    tensors, meta = read_safetensors(weights_path)
    state = export_state(config, tensors, config_path)
    if CONFIG_KEY in meta:
        embedded = _embedded_config(meta, weights_path)
        if embedded != config:
            fields = sorted(k for k in set(config) | set(embedded) if config.get(k) != embedded.get(k))
            raise CheckpointError(
                f"{config_path}: differs from the config that {weights_path} was written with (fields {fields}); "
                "the folder was edited or mixes two exports")
    return {**state, "config_path": config_path, "weights_path": weights_path}


def _from_torch_export(state: Dict[str, Any]) -> Dict[str, Any]:
    """A version-1 torch export in the shape of a safetensors export (its config has no
    front-end options or head)."""
    config = {"format": EXPORT_FORMAT, "version": TORCH_EXPORT_VERSION, "encoder": dict(state["encoder_config"]),
              "frontend": {"target_length": state.get("target_length"), "norm_stats": dict(state["norm_stats"])},
              "source": {"file": state.get("source")}, "head": None}
    return {"format": EXPORT_FORMAT, "version": TORCH_EXPORT_VERSION, "config": config, "model": state["model"]}


def load_checkpoint(path: str, trusted: bool = False) -> Dict[str, Any]:
    """Read an encoder export (safetensors or torch), a Hugging Face folder or a fairseq
    checkpoint onto the CPU (torch files with ``weights_only=True`` unless ``trusted``).
    Returns a dict with a ``model`` entry (the weights); an export of either version and a
    Hugging Face folder come as ``{"format", "version", "config", "model"}`` (``config``: see
    :func:`export_config`; a folder's also has ``config_path`` and ``weights_path``)."""
    if is_hub_folder(path):
        return _read_hub_folder(path)
    if os.path.isfile(path) and is_safetensors(path):
        return _read_export(path)
    state = read_torch_file(path, trusted)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: no 'model' entry; not a fairseq or exported checkpoint")
    if is_exported(state) and _export_version(state, path) == TORCH_EXPORT_VERSION:
        return _from_torch_export(state)
    return state


def model_config(state: Dict[str, Any], path: str = "<checkpoint>") -> Dict[str, Any]:
    """The model config stored in a fairseq checkpoint of this plugin (``supmam_clap`` or
    ``mam_clap_classifier``), as a dict."""
    cfg = state.get("cfg") or {}
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not model_cfg or model_cfg.get("_name") not in (PRETRAINING_MODEL, FINETUNING_MODEL):
        name = model_cfg.get("_name") if model_cfg else None
        hint = ""
        if name is None and isinstance(state.get("model"), dict) and "patch_embed.proj.weight" in state["model"]:
            hint = "; it looks like an AudioMAE file: convert it with examples/convert/audiomae_to_mam_clap.py"
        raise CheckpointError(
            f"{path}: model is {name!r}, expected a '{PRETRAINING_MODEL}' (pretraining) or "
            f"'{FINETUNING_MODEL}' (fine-tuning) checkpoint{hint}")
    return dict(model_cfg)


def is_exported(state: Dict[str, Any]) -> bool:
    """True for a file written by :func:`save_encoder` (either version)."""
    return state.get("format") == EXPORT_FORMAT


def _export_version(state: Dict[str, Any], path: str) -> int:
    version = state.get("version")
    if version not in (EXPORT_VERSION, TORCH_EXPORT_VERSION):
        raise CheckpointError(f"{path}: encoder export version {version!r}; this code reads versions "
                              f"{TORCH_EXPORT_VERSION} (.pt) and {EXPORT_VERSION} (.safetensors)")
    return version


def infer_encoder_config(weights: Dict[str, torch.Tensor], num_heads: int, path: str = "<checkpoint>",
                         num_mel_bins: int = NUM_MEL_BINS) -> Dict[str, Any]:
    """:class:`AudioEncoder` arguments read from an encoder state dict's shapes (this
    encoder's key names); the head count is not in the shapes, so it is given.

    ``embed_dim`` from ``cls_token`` (1, 1, D); ``depth`` from the ``blocks.{i}`` indices;
    ``mlp_ratio`` from ``blocks.0.mlp.fc1.weight`` (hidden, D); ``max_frames`` from
    ``pos_embed`` (1, 1 + t * F/16, D): 16 * t; ``final_norm`` from the presence of ``norm.*``.
    """
    missing = [k for k in ("cls_token", "pos_embed", "blocks.0.mlp.fc1.weight") if k not in weights]
    if missing:
        raise CheckpointError(f"{path}: encoder weights lack {missing}; cannot read the architecture")
    dim = int(weights["cls_token"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    grid_freq = num_mel_bins // PATCH_SIZE
    positions = int(weights["pos_embed"].shape[1]) - 1
    if positions <= 0 or positions % grid_freq:
        raise CheckpointError(f"{path}: pos_embed has {positions + 1} rows; expected 1 + t * {grid_freq}")
    if num_heads <= 0 or dim % num_heads:
        raise CheckpointError(f"{path}: {num_heads} attention heads do not divide the width {dim}")
    return {
        "embed_dim": dim,
        "depth": depth,
        "num_heads": int(num_heads),
        "mlp_ratio": weights["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "max_frames": positions // grid_freq * PATCH_SIZE,
        "num_mel_bins": num_mel_bins,
        "final_norm": "norm.weight" in weights or "norm.bias" in weights,
    }


def _prefixed(weights: Dict[str, torch.Tensor], prefix: str = "encoder.") -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def encoder_config(state: Dict[str, Any], path: str = "<checkpoint>") -> Dict[str, Any]:
    """:class:`AudioEncoder` constructor arguments of any file :func:`load_checkpoint` reads."""
    if is_exported(state):
        return dict(state["config"]["encoder"])
    cfg = model_config(state, path)
    if cfg["_name"] == FINETUNING_MODEL:
        heads = cfg.get("encoder_attention_heads", cfg.get("num_heads"))
        if heads is None:
            raise CheckpointError(f"{path}: fine-tuning config has no model.encoder_attention_heads (or num_heads)")
        return infer_encoder_config(_prefixed(state["model"]), int(heads), path)
    return {arg: cfg[name] for name, arg in MODEL_CONFIG_FIELDS.items()}


def head_keys(state: Dict[str, Any]) -> list:
    """Names of the classifier weights an export keeps next to the encoder (``config["head"]``)."""
    head = state["config"].get("head") if is_exported(state) else None
    return list(head["keys"]) if head else []


def _encoder_weights(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    if is_exported(state):
        skip = set(head_keys(state))
        return {k: v for k, v in state["model"].items() if k not in skip}
    return _prefixed(state["model"])


def load_weights_strictly(module: torch.nn.Module, weights: Dict[str, torch.Tensor], state: Dict[str, Any],
                          path: str) -> torch.nn.Module:
    """``module.load_state_dict(weights)`` where every name and shape must match; a mismatch
    raises :class:`CheckpointError` naming the weights file (a folder's ``model.safetensors``).
    Returns the module in eval mode."""
    where = state.get("weights_path", path)
    against = f"the config in {state['config_path']}" if "config_path" in state else "the config"
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a shape mismatch
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{where}: encoder weights do not fit {against} ({detail})") from err
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: encoder weights do not match {against}: missing {missing}, unexpected {unexpected}")
    return module.eval()


def _build_encoder(state: Dict[str, Any], path: str) -> AudioEncoder:
    config = encoder_config(state, path)
    try:
        encoder = AudioEncoder(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{state.get('config_path', path)}: cannot build the encoder {config} ({err})") from err
    return load_weights_strictly(encoder, _encoder_weights(state), state, path)


def _task_config(state: Dict[str, Any]) -> Dict[str, Any]:
    cfg = state.get("cfg") or {}
    task = cfg.get("task") if isinstance(cfg, dict) else None
    return dict(task) if task else {}


def _norm_spec(state: Dict[str, Any]) -> str:
    """A fairseq checkpoint's ``task.norm_stats`` (name or 'mean,std'), default audioset."""
    return str(_task_config(state).get("norm_stats") or DEFAULT_NORM_STATS)


def _frontend(state: Dict[str, Any], path: str) -> Dict[str, Any]:
    """An export's front end; a safetensors export's is checked against this code's fbank
    (the torch export of version 1 records none)."""
    frontend = state["config"]["frontend"]
    if state["version"] == TORCH_EXPORT_VERSION:
        return frontend
    if frontend.get("sample_rate") != SAMPLE_RATE or frontend.get("fbank_options") != FBANK_OPTIONS:
        raise CheckpointError(
            f"{state.get('config_path', path)}: the encoder expects another front end (sample_rate "
            f"{frontend.get('sample_rate')}, fbank {frontend.get('fbank_options')}) than this code computes "
            f"(sample_rate {SAMPLE_RATE}, fbank {FBANK_OPTIONS})")
    return frontend


def norm_stats(state: Dict[str, Any], path: str = "<checkpoint>") -> tuple[float, float]:
    """(mean, std) of the fbank normalisation the encoder was trained with.

    Exports store them; fairseq checkpoints store ``cfg.task.norm_stats`` (a name from
    ``NORM_STATS`` or ``'mean,std'``), or the task default ``audioset`` when absent.
    """
    if is_exported(state):
        stats = _frontend(state, path)["norm_stats"]
        return float(stats["mean"]), float(stats["std"])
    try:
        return resolve_norm_stats(_norm_spec(state))
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err


def _norm_spec_of(state: Dict[str, Any], mean: float, std: float) -> str:
    if is_exported(state):
        return state["config"]["frontend"]["norm_stats"].get("spec", f"{mean},{std}")
    return _norm_spec(state)


def _target_length(state: Dict[str, Any]) -> Optional[int]:
    if is_exported(state):
        value = state["config"]["frontend"]["target_length"]
    else:
        value = _task_config(state).get("target_length")
    return None if value is None else int(value)


class EncoderBundle(NamedTuple):
    """What an upstream needs from a checkpoint: the encoder (eval mode), the fbank
    normalisation ``(fbank - norm_mean) / (2 * norm_std)``, and the clip length in frames
    the encoder was trained on (``task.target_length``; None if unknown)."""

    encoder: AudioEncoder
    norm_mean: float
    norm_std: float
    target_length: Optional[int]


def load_encoder(path: str, trusted: bool = False) -> AudioEncoder:
    """The :class:`AudioEncoder` of an encoder export (safetensors or ``.pt``), a converted
    AudioMAE file, or a pretraining or fine-tuning checkpoint, in eval mode (strict load)."""
    return _build_encoder(load_checkpoint(path, trusted), path)


def load_encoder_with_stats(path: str, trusted: bool = False) -> EncoderBundle:
    """:func:`load_encoder` plus the normalisation stats and training clip length."""
    return _bundle(load_checkpoint(path, trusted), path)


def _bundle(state: Dict[str, Any], path: str) -> EncoderBundle:
    encoder = _build_encoder(state, path)
    mean, std = norm_stats(state, path)
    return EncoderBundle(encoder, mean, std, _target_length(state))


def _source_kind(state: Dict[str, Any]) -> str:
    if is_exported(state):
        return EXPORT_FORMAT
    return f"fairseq:{model_config(state)['_name']}"


#: The paper's variant of a pretraining config, by (model.target, model.classification_branch).
VARIANTS = {("pixel", False): "MAM", ("clap", False): "MAM-CLAP", ("pixel", True): "SupMAM",
            ("clap", True): "SupMAM-CLAP"}


def pretraining_variant(state: Dict[str, Any]) -> Optional[str]:
    """The paper's variant (MAM, MAM-CLAP, SupMAM, SupMAM-CLAP) an encoder was pretrained as: read
    from a pretraining checkpoint's model config, or carried by an export made from one; None
    when unknown (a fine-tuning checkpoint, a converted AudioMAE file)."""
    if is_exported(state):
        return (state["config"].get("source") or {}).get("variant")
    cfg = model_config(state)
    if cfg["_name"] != PRETRAINING_MODEL:
        return None
    return VARIANTS.get((str(cfg.get("target", "pixel")), bool(cfg.get("classification_branch", False))))


def checkpoint_sha256(path: str) -> str:
    """SHA-256 that identifies any file :func:`load_checkpoint` reads: the file's, or for a
    Hugging Face folder its ``model.safetensors``'s (which holds the config too)."""
    return file_sha256(os.path.join(path, HUB_WEIGHTS) if is_hub_folder(path) else path)


def export_arguments(checkpoint_path: str, trusted: bool = False,
                     state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The arguments of :func:`save_encoder` / :func:`export_contents` (all but ``out_path``)
    that export the encoder of any file :func:`load_encoder` reads: its architecture, front
    end, the source's name, sha256 and kind, and any head an export keeps. ``state``: the
    file's :func:`load_checkpoint` result when the caller has read it already."""
    if state is None:
        state = load_checkpoint(checkpoint_path, trusted)
    bundle = _bundle(state, checkpoint_path)
    config = encoder_config(state, checkpoint_path)
    config.setdefault("num_mel_bins", bundle.encoder.num_mel_bins)
    head = None
    if head_keys(state):
        head = {"config": dict(state["config"]["head"]), "weights": {k: state["model"][k] for k in head_keys(state)}}
    return dict(encoder=bundle.encoder, config=config, norm_mean=bundle.norm_mean, norm_std=bundle.norm_std,
                norm_spec=_norm_spec_of(state, bundle.norm_mean, bundle.norm_std),
                target_length=bundle.target_length, source=os.path.basename(os.path.normpath(checkpoint_path)),
                source_sha256=checkpoint_sha256(checkpoint_path), source_kind=_source_kind(state), head=head,
                source_extra={"variant": pretraining_variant(state)})


def export_encoder(checkpoint_path: str, out_path: str, trusted: bool = False) -> Dict[str, Any]:
    """Write the encoder of any file :func:`load_encoder` reads as an encoder export:
    ``OUT.safetensors`` (+ ``OUT.json``) for a ``.safetensors`` name, the torch export
    (version 1) otherwise; see :func:`save_encoder`. A head kept by an export (a converted
    fine-tuned AudioMAE file) is kept. Returns the written metadata. (A Hugging Face folder:
    :func:`mam_clap_plugin.hub.export_hub_folder`.)"""
    return save_encoder(out_path, **export_arguments(checkpoint_path, trusted))


def export_config(encoder: AudioEncoder, config: Dict[str, Any], norm_mean: float, norm_std: float, norm_spec: str,
                  target_length: Optional[int], source: Dict[str, Any], head: Optional[Dict[str, Any]] = None
                  ) -> Dict[str, Any]:
    """The JSON config of a safetensors export::

        {"format": "mam_clap_encoder", "version": 2,
         "encoder": {AudioEncoder kwargs: embed_dim, depth, num_heads, mlp_ratio, max_frames,
                     num_mel_bins, final_norm},
         "frontend": {"sample_rate": 16000, "fbank": "torchaudio.compliance.kaldi.fbank",
                      "fbank_options": {...}, "waveform_mean_removed": true,
                      "target_length": frames or null,
                      "norm_stats": {"mean", "std", "spec"}, "normalisation": "(fbank - mean) / (2 * std)"},
         "source": {"file": basename, "sha256": hex, "kind": str,
                    "variant": "MAM" | "MAM-CLAP" | "SupMAM" | "SupMAM-CLAP" | null, ...},
         "head": null, or {"num_classes": C, "pooling": "mean", "keys": [names]} for a kept
                 classifier: fc_norm.weight / fc_norm.bias (D,), head.weight (C, D), head.bias (C,)}
    """
    arch = {**config, "num_mel_bins": encoder.num_mel_bins,
            "final_norm": isinstance(encoder.norm, torch.nn.LayerNorm)}
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "encoder": arch,
        "frontend": {
            "sample_rate": SAMPLE_RATE,
            "fbank": "torchaudio.compliance.kaldi.fbank",
            "fbank_options": dict(FBANK_OPTIONS),
            "waveform_mean_removed": True,
            "target_length": target_length,
            "norm_stats": {"mean": float(norm_mean), "std": float(norm_std), "spec": norm_spec},
            "normalisation": NORMALISATION,
        },
        "source": dict(source),
        "head": head,
    }


def sidecar_path(out_path: str) -> str:
    """``ENCODER.json`` next to ``ENCODER.safetensors``."""
    return os.path.splitext(out_path)[0] + ".json"


def _copies(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached, contiguous copies of ``weights`` (what an export writes)."""
    return {k: v.detach().clone().contiguous() for k, v in weights.items()}


def export_contents(encoder: AudioEncoder, config: Dict[str, Any], norm_mean: float, norm_std: float,
                    norm_spec: str, target_length: Optional[int], source: str, *, source_sha256: Optional[str] = None,
                    source_kind: Optional[str] = None, source_extra: Optional[Dict[str, Any]] = None,
                    head: Optional[Dict[str, Any]] = None, where: str = "<export>"
                    ) -> tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(:func:`export_config`, weights) of a safetensors export: the encoder's state dict (no
    prefix, contiguous copies) plus any ``head["weights"]``. ``head`` is ``{"config":
    {"num_classes", "pooling", ...}, "weights": {name: tensor}}``."""
    weights = _copies(encoder.state_dict())
    head_config = None
    if head is not None:
        head_weights = _copies(head["weights"])
        clash = sorted(set(head_weights) & set(weights))
        if clash:
            raise CheckpointError(f"{where}: head weights {clash} clash with encoder keys")
        weights.update(head_weights)
        head_config = {**head["config"], "keys": sorted(head_weights)}
    src = {"file": source, "sha256": source_sha256, "kind": source_kind, **(source_extra or {})}
    return export_config(encoder, config, norm_mean, norm_std, norm_spec, target_length, src, head_config), weights


def write_safetensors(out_path: str, weights: Dict[str, torch.Tensor], config: Dict[str, Any],
                      metadata: Optional[Dict[str, str]] = None) -> str:
    """Write ``weights`` to ``out_path`` atomically (:func:`~mam_clap_plugin.files.atomic_write`)
    with ``config`` as the JSON header metadata ``"mam_clap_config"`` (plus ``metadata``), with
    the usual file mode. Returns the JSON text. A failed write (a full disk) raises an ``OSError``
    naming ``out_path`` and leaves no temporary file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    text = json.dumps(config, indent=2)

    def write(tmp: str) -> None:
        try:
            save_file(weights, tmp, metadata={**(metadata or {}), CONFIG_KEY: text})
        except SafetensorError as err:  # an I/O error comes as "I/O error: ... (os error N)"
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from err
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file owner-only; give it the usual mode

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write(out_path, write, what="encoder export")
    return text


def write_text(path: str, text: str) -> None:
    """Write a text file atomically (:func:`~mam_clap_plugin.files.atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, what="file")


def save_encoder(out_path: str, encoder: AudioEncoder, config: Dict[str, Any], norm_mean: float, norm_std: float,
                 norm_spec: str, target_length: Optional[int], source: str, *, source_sha256: Optional[str] = None,
                 source_kind: Optional[str] = None, source_extra: Optional[Dict[str, Any]] = None,
                 head: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``encoder`` (constructor arguments ``config``) as an encoder export, atomically
    (:func:`~mam_clap_plugin.files.atomic_write`: a failed write, a full disk say, raises an
    ``OSError`` naming the file and leaves no temporary file).

    * ``OUT.safetensors``: the encoder's state dict (no prefix) plus any ``head["weights"]``,
      with :func:`export_config` as header metadata ``"mam_clap_config"``; the same JSON is
      written to ``OUT.json`` for reading.
    * any other name: the torch export of version 1, a dict of plain values and tensors
      ``{"format", "version": 1, "encoder_config", "model", "norm_stats": {"mean", "std",
      "spec"}, "target_length", "source"}`` (no head).

    ``head`` is ``{"config": {"num_classes", "pooling", ...}, "weights": {name: tensor}}``.
    Returns the metadata (everything except the weights).
    """
    if not out_path.endswith(".safetensors"):
        if head is not None:
            raise CheckpointError(f"{out_path}: a classifier head is kept only in a .safetensors export")
        meta = {
            "format": EXPORT_FORMAT,
            "version": TORCH_EXPORT_VERSION,
            "encoder_config": dict(config),
            "norm_stats": {"mean": norm_mean, "std": norm_std, "spec": norm_spec},
            "target_length": target_length,
            "source": source,
        }
        state = {**meta, "model": _copies(encoder.state_dict())}
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        atomic_write(out_path, lambda tmp: torch_save(state, tmp), what="encoder export")
        return meta
    meta, weights = export_contents(encoder, config, norm_mean, norm_std, norm_spec, target_length, source,
                                    source_sha256=source_sha256, source_kind=source_kind, source_extra=source_extra,
                                    head=head, where=out_path)
    text = write_safetensors(out_path, weights, meta)
    write_text(sidecar_path(out_path), text + "\n")
    return meta
