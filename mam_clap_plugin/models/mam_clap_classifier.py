"""Clip classifier for fine-tuning (registered as ``mam_clap_classifier``).

The shared :class:`AudioEncoder` with a linear head, AudioMAE's fine-tuning model:

    source (B, 1, T, 128), T <= max_frames (shorter inputs use the first T/16 time
      columns of the position table)
      -> training only: drop whole time columns / frequency rows of patch tokens
         (mask_t_prob / mask_f_prob)
      -> encoder blocks with stochastic depth (drop_path)
      -> pooling=mean: mean of the patch tokens (not cls) -> fc_norm (LayerNorm)
         pooling=cls:  the encoder's final LayerNorm -> cls token
      -> Linear (truncated-normal init, std 2e-5) -> logits (B, K)

With mean pooling the encoder's final LayerNorm is dropped (fc_norm replaces it), as
in AudioMAE. ``model.model_path`` names the pretrained encoder: a pretraining
checkpoint of this plugin or an encoder export (``examples/export_encoder.py``), read by
:func:`mam_clap_plugin.checkpoint.load_encoder_with_stats` (strict; a mismatch lists
the missing and unexpected keys). Unset, the encoder is randomly initialised from the
``encoder_*`` fields. Loading writes the file's architecture into the config, so a
fine-tuned checkpoint rebuilds without the pretraining file.

Layer-wise lr decay (``layer_decay`` d, L blocks) tags every parameter for the
``mam_clap_adamw`` optimizer through ``param.optim_overrides``: patch embedding and
cls token ``d^(L+1)``, block k (0-based) ``d^(L-k)``, fc_norm / head / final norm 1;
biases, norms and the cls token get no weight decay.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import open_dict

from ..checkpoint import load_encoder_with_stats
from ..modules.encoder import MODEL_CONFIG_FIELDS, AudioEncoder
from ..optim import set_overrides
from .encoder_config import EncoderConfig

logger = logging.getLogger(__name__)

POOLING_CHOICES = ChoiceEnum(["mean", "cls"])


@dataclass
class MamClapClassifierConfig(EncoderConfig):
    model_path: Optional[str] = field(
        default=None,
        metadata={"help": "pretrained encoder: a pretraining checkpoint or an encoder export; unset = random init"},
    )
    num_classes: int = field(default=0, metadata={"help": "head outputs; 0 = the task's class list"})
    pooling: POOLING_CHOICES = field(  # type: ignore
        default="mean", metadata={"help": "mean: mean of patch tokens + fc_norm (AudioMAE); cls: the cls token"}
    )
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth of the last block (linear from 0)"})
    mask_t_prob: float = field(
        default=0.2, metadata={"help": "training: fraction of time columns of patch tokens dropped (AudioMAE 0.2)"}
    )
    mask_f_prob: float = field(
        default=0.2, metadata={"help": "training: fraction of frequency rows of patch tokens dropped (AudioMAE 0.2)"}
    )
    layer_decay: float = field(default=0.75, metadata={"help": "layer-wise lr decay (1 = off)"})
    head_init_std: float = field(default=2e-5, metadata={"help": "std of the head's truncated-normal init"})


@register_model("mam_clap_classifier", dataclass=MamClapClassifierConfig)
class MamClapClassifier(BaseFairseqModel):
    def __init__(self, cfg: MamClapClassifierConfig, encoder: AudioEncoder):
        super().__init__()
        if cfg.num_classes <= 0:
            raise ValueError("model.num_classes must be > 0 (set task.class_list or model.num_classes)")
        self.cfg = cfg
        self.encoder = encoder
        encoder.set_drop_path(cfg.drop_path)
        dim = encoder.embed_dim
        if cfg.pooling == "mean":
            encoder.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=cfg.head_init_std)
        nn.init.zeros_(self.head.bias)
        self.tag_parameters()

    @classmethod
    def build_model(cls, cfg: MamClapClassifierConfig, task=None):
        """The encoder from ``cfg.model_path`` (architecture written into ``cfg``) or random."""
        if cfg.model_path:
            bundle = load_encoder_with_stats(cfg.model_path)
            encoder = bundle.encoder
            arch = encoder.config
            if arch["num_mel_bins"] != 128:
                raise ValueError(f"{cfg.model_path}: encoder takes {arch['num_mel_bins']} mel bins; the task gives 128")
            with open_dict(cfg):
                for name, arg in MODEL_CONFIG_FIELDS.items():
                    cfg[name] = arch[arg]
            logger.info(f"encoder from {cfg.model_path}: {cfg.encoder_layers} blocks x {cfg.encoder_embed_dim}, "
                        f"{cfg.max_frames} frames (pretrained with norm stats {bundle.norm_mean}, {bundle.norm_std})")
        else:  # random, or a checkpoint's weights come next (the fine-tuning task says which)
            encoder = AudioEncoder.from_model_config(cfg)
        return cls(cfg, encoder.train())

    def layer_id(self, name: str) -> int:
        """0: patch embedding and cls token; k + 1: block k; L + 1: everything after the blocks."""
        depth = len(self.encoder.blocks)
        if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
            return 0
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return depth + 1

    def tag_parameters(self) -> None:
        """Layer-decay lr scales and no weight decay on biases, norms and the cls token."""
        depth = len(self.encoder.blocks)
        for name, param in self.named_parameters():
            scale = self.cfg.layer_decay ** (depth + 1 - self.layer_id(name))
            if param.ndim <= 1 or name == "encoder.cls_token":
                set_overrides(param, lr_scale=scale, weight_decay=0.0)
            else:
                set_overrides(param, lr_scale=scale)

    def forward(self, source: torch.Tensor):
        """source: (B, 1, T, 128) normalised fbank -> {"logits": (B, K)}; token masking in training only."""
        masking = dict(mask_t_prob=self.cfg.mask_t_prob, mask_f_prob=self.cfg.mask_f_prob) if self.training else {}
        x, _ = self.encoder(source, **masking)
        pooled = x[:, 1:].mean(dim=1) if self.cfg.pooling == "mean" else x[:, 0]
        return {"logits": self.head(self.fc_norm(pooled))}
