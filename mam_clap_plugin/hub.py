"""The encoder in the Hugging Face layout: :class:`MamClapEncoder`, built on
``huggingface_hub``'s ``PyTorchModelHubMixin`` (``save_pretrained``, ``from_pretrained``,
``push_to_hub``).

A Hugging Face folder (or Hub repository) of this project holds

* ``config.json``: the encoder export's JSON config exactly
  (:func:`mam_clap_plugin.checkpoint.export_config`: architecture, front end, source);
* ``model.safetensors``: the encoder's weights under the export's names (plus a kept
  classifier head), with the same config in its header metadata, so the file alone is also
  an encoder export;
* ``README.md``: a model card (source sha256, variant, front end, how to load it).

Write one with ``python examples/export_encoder.py CKPT OUT --hub`` (or
:func:`export_hub_folder`). ``mam_clap_plugin.load_encoder``, the s3prl upstream (``-k``),
``examples/extract_features.py`` and ``mam_clap_plugin.hear.load_model`` read the folder
through :func:`mam_clap_plugin.checkpoint.load_checkpoint`, as :meth:`MamClapEncoder.from_pretrained`
does: a folder whose files are missing, unreadable, disagree with each other or with the
architecture is refused with a :class:`~mam_clap_plugin.files.CheckpointError` naming the file.

Loading a local folder needs no network. This module needs ``huggingface_hub`` (the ``hub``
extra); nothing here imports fairseq or s3prl.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from huggingface_hub import ModelCard, PyTorchModelHubMixin

from .checkpoint import (
    EXPORT_VERSION,
    HUB_CONFIG,
    HUB_WEIGHTS,
    export_arguments,
    export_contents,
    export_state,
    is_exported,
    load_checkpoint,
    load_weights_strictly,
    norm_stats,
    write_safetensors,
    write_text,
)
from .convert import HEAD_KEYS  # the classifier weights an export may keep
from .features import check_window, clip_fbank, encode_windows, parse_layer, pool_outputs
from .files import CheckpointError
from .modules.encoder import AudioEncoder


class MamClapEncoder(AudioEncoder, PyTorchModelHubMixin, library_name="mam-clap", tags=["audio", "mam-clap"],
                     pipeline_tag="feature-extraction"):
    """:class:`AudioEncoder` built from an export config, with the Hugging Face mixin.

    Args:
        config: an encoder export's JSON config (what ``config.json`` holds; see
            :func:`mam_clap_plugin.checkpoint.export_config`), version 2, with this code's
            front end. A config with a ``head`` also holds the kept classifier's weights
            (``fc_norm`` and ``head``; stored, not applied: ``mam_clap_plugin.inference``
            scores with them).

    Attributes:
        export_config: the config (written back unchanged by ``save_pretrained``).
        norm_mean, norm_std: the fbank normalisation ``(fbank - mean) / (2 * std)``.
        target_length: the clip length in frames the encoder was trained on (or None).
    """

    def __init__(self, config: Dict[str, Any]):
        mean, std = self.check_config(config)
        super().__init__(**config["encoder"])
        self.export_config = json.loads(json.dumps(config))  # a plain copy
        self.norm_mean, self.norm_std = mean, std
        target = config["frontend"].get("target_length")
        self.target_length = None if target is None else int(target)
        head = config.get("head")
        if head:
            self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
            self.head = nn.Linear(self.embed_dim, int(head["num_classes"]))

    @staticmethod
    def check_config(config: Dict[str, Any], where: str = "<config>") -> tuple[float, float]:
        """Refuse (:class:`CheckpointError` naming ``where``) a config that is not an export config
        of version 2 with this code's front end and a known head; returns (norm_mean, norm_std)."""
        state = export_state(config, {}, where)  # format, a known version, encoder and frontend objects
        if state["version"] != EXPORT_VERSION:
            raise CheckpointError(f"{where}: version {state['version']!r}; MamClapEncoder takes an encoder export "
                                  f"config of version {EXPORT_VERSION}")
        mean, std = norm_stats(state, where)  # checks the front end
        head = config.get("head")
        if head and sorted(head.get("keys", ())) != sorted(HEAD_KEYS):
            raise CheckpointError(f"{where}: head keys {head.get('keys')}; expected {list(HEAD_KEYS)}")
        return mean, std

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(cls, path: str, trusted: bool = False,
                        state: Optional[Dict[str, Any]] = None) -> "MamClapEncoder":
        """The encoder of any file ``mam_clap_plugin.load_encoder`` reads, exported afresh (as
        ``examples/export_encoder.py`` does: the config names ``path`` as its source).
        ``state``: the file as :func:`~mam_clap_plugin.checkpoint.load_checkpoint` read it, if
        the caller has it (the file is not read again)."""
        meta, weights = export_contents(**export_arguments(path, trusted, state), where=path)
        return load_weights_strictly(cls(meta), weights, {}, path)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        **model_kwargs) -> "MamClapEncoder":
        """Load a Hugging Face folder or a Hub repository id (``user/name``), in eval mode.

        A local path is read by ``mam_clap_plugin.checkpoint.load_checkpoint`` (no network):
        a folder, or any encoder export file as it is; a pretraining or fine-tuning checkpoint
        is exported first (:meth:`from_checkpoint`). A repository id downloads ``config.json``
        and ``model.safetensors`` into the Hugging Face cache first (the usual arguments).
        ``map_location`` (default ``"cpu"``) moves the loaded encoder. Mismatches raise
        :class:`CheckpointError` naming the file.
        """
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, **model_kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", strict: bool = True,
                         trusted: bool = False, **model_kwargs) -> "MamClapEncoder":
        if model_kwargs:
            raise TypeError(f"MamClapEncoder.from_pretrained: unexpected arguments {sorted(model_kwargs)}")
        if not strict:
            raise ValueError("MamClapEncoder loads strictly (strict=False is not supported)")
        path = model_id
        if not os.path.exists(path):
            path = _download(model_id, revision, cache_dir, force_download, local_files_only, token)
        state = load_checkpoint(path, trusted)
        if not is_exported(state) or state["version"] != EXPORT_VERSION:
            return cls.from_checkpoint(path, trusted, state).to(map_location)
        where = state.get("config_path", path)
        cls.check_config(state["config"], where)
        try:
            model = cls(state["config"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: cannot build the encoder {state['config']['encoder']} ({err})") from err
        return load_weights_strictly(model, state["model"], state, path).to(map_location)

    # ---------------------------------------------------------------- saving

    def _save_pretrained(self, save_directory: Path) -> None:
        """``model.safetensors`` (the config in its metadata) and ``config.json``, the export's JSON."""
        weights = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        text = write_safetensors(str(save_directory / HUB_WEIGHTS), weights, self.export_config,
                                 metadata={"format": "pt"})
        write_text(str(save_directory / HUB_CONFIG), text + "\n")

    def generate_model_card(self, *args, repo_id: Optional[str] = None, **kwargs) -> ModelCard:
        """The model card (``README.md``): source sha256, variant, front end, how to load it.
        ``repo_id`` (``model_card_kwargs={"repo_id": ...}``) goes into the loading example."""
        return ModelCard(model_card(self.export_config, repo_id))

    # ---------------------------------------------------------------- features

    def features(self, wav: torch.Tensor, level: str = "clip", layer="final",
                 window_frames: Optional[int] = None) -> torch.Tensor:
        """Features of one 16 kHz waveform (S,) of any length, exactly as
        ``examples/extract_features.py`` computes them (``mam_clap_plugin.features``):
        ``level`` ``"clip"`` (D,), ``"frame"`` (T, D) per 160 ms, ``"patch"`` (T, F, D);
        ``layer`` ``"final"``, a hidden state 0..depth or ``"all"`` (stacked first). The
        gradient mode is the caller's (wrap in ``torch.inference_mode()`` for inference)."""
        device = self.cls_token.device
        fbank = clip_fbank(wav.to(device=device, dtype=torch.float32), self.norm_mean, self.norm_std)
        outputs = encode_windows(self, [fbank], check_window(self, window_frames))[0]
        return pool_outputs(outputs, level, parse_layer(layer, len(self.blocks)))


def _download(repo_id: str, revision, cache_dir, force_download: bool, local_files_only: bool, token) -> str:
    """The snapshot folder of a Hub repository holding its config.json and model.safetensors."""
    from huggingface_hub import hf_hub_download

    try:
        files = [hf_hub_download(repo_id=repo_id, filename=name, revision=revision, cache_dir=cache_dir,
                                 force_download=force_download, token=token, local_files_only=local_files_only)
                 for name in (HUB_CONFIG, HUB_WEIGHTS)]
    except Exception as err:  # huggingface_hub raises many kinds (offline, not found, invalid id)
        raise CheckpointError(f"{repo_id}: not a local folder or file, and not loadable from the Hugging Face Hub "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from err
    return os.path.dirname(files[0])


def export_hub_folder(checkpoint_path: str, out_dir: str, trusted: bool = False,
                      repo_id: Optional[str] = None) -> Dict[str, Any]:
    """Write the encoder of any file ``load_encoder`` reads as a Hugging Face folder
    ``out_dir`` (``config.json``, ``model.safetensors``, ``README.md``). Returns the config."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a folder")
    model = MamClapEncoder.from_checkpoint(checkpoint_path, trusted)
    card = os.path.join(out_dir, "README.md")
    if os.path.isfile(card):  # save_pretrained keeps an existing model card: write this one
        os.remove(card)
    model.save_pretrained(out_dir, model_card_kwargs={"repo_id": repo_id} if repo_id else None)
    return model.export_config


def _variant(config: Dict[str, Any]) -> List[str]:
    enc, src, head = config["encoder"], config.get("source") or {}, config.get("head")
    kinds = {"fairseq:supmam_clap": "pretraining checkpoint (model supmam_clap)",
             "fairseq:mam_clap_classifier": "fine-tuned (mam_clap_classifier) checkpoint",
             "mam_clap_encoder": "encoder export", "audiomae:pretraining": "converted AudioMAE (pretrained)",
             "audiomae:finetuning": "converted AudioMAE (fine-tuned)"}
    kind = src.get("kind")
    return [
        f"- Encoder: ViT over 16x16 fbank patches, width {enc['embed_dim']}, {enc['depth']} blocks, "
        f"{enc['num_heads']} heads, MLP ratio {enc['mlp_ratio']}, at most {enc['max_frames']} frames per window "
        f"({enc['max_frames'] // 16} x {enc['num_mel_bins'] // 16} patches), final LayerNorm: "
        f"{'yes' if enc.get('final_norm', True) else 'no'}.",
        f"- Source: `{src.get('file')}`, {kinds.get(kind, kind)} (`{kind}`), sha256 `{src.get('sha256')}`.",
        f"- Pretrained as: {src.get('variant') or 'unknown (not recorded by the source)'}.",
        "- Classifier head: " + (f"kept ({head['num_classes']} classes, {head.get('pooling', 'mean')} pooling; "
                                 "stored, not applied by the encoder)." if head else "none."),
    ]


def model_card(config: Dict[str, Any], repo_id: Optional[str] = None) -> str:
    """The model card text of a Hugging Face folder with this ``config``."""
    enc, front = config["encoder"], config["frontend"]
    stats = front["norm_stats"]
    target = front.get("target_length")
    where = repo_id or "REPO_ID_OR_FOLDER"
    lines = [
        "---",
        "library_name: mam-clap",
        "pipeline_tag: feature-extraction",
        "tags:",
        "- audio",
        "- mam-clap",
        "- model_hub_mixin",
        "- pytorch_model_hub_mixin",
        "---",
        "",
        f"# mam-clap encoder ({enc['embed_dim']} x {enc['depth']})",
        "",
        "The audio encoder of a mam-clap model (SupMAM-CLAP: masked audio modelling with "
        "CLAP teacher targets and a supervised branch), in the Hugging Face layout: `config.json` is the "
        "encoder export's config, `model.safetensors` its weights.",
        "",
        "## Variant",
        "",
        *_variant(config),
        "",
        "## Front end",
        "",
        f"- Input: mono waveform at {front['sample_rate']} Hz, mean removed.",
        f"- `{front['fbank']}` with {json.dumps(front['fbank_options'], sort_keys=True)}.",
        f"- Normalisation {front['normalisation']} with mean {stats['mean']}, std {stats['std']} "
        f"(`{stats.get('spec')}`).",
        f"- Trained on clips of {target} frames ({target / 100:.2f} s); longer sounds are encoded by windows of "
        f"at most {enc['max_frames']} frames." if target else
        f"- Longer sounds are encoded by windows of at most {enc['max_frames']} frames.",
        "- One time step = one 16-frame time patch = 160 ms.",
        "",
        "## Load it",
        "",
        "```python",
        "from mam_clap_plugin.hub import MamClapEncoder",
        f'encoder = MamClapEncoder.from_pretrained("{where}")  # a Hub id (user/name) or a local folder',
        f"clip = encoder.features(wav)  # wav: (samples,) float tensor at 16 kHz -> ({enc['embed_dim']},)",
        "```",
        "",
        "`mam_clap_plugin.load_encoder(FOLDER)`, the s3prl upstream (`-u supmam_clap_local -k FOLDER`), "
        "`examples/extract_features.py --checkpoint FOLDER` and the HEAR API (`mam_clap_plugin.hear.load_model"
        "(FOLDER)`) read a local copy of this folder as well.",
        "",
    ]
    return "\n".join(lines)
