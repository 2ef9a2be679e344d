"""SupMAM-CLAP pretraining model (registered as ``supmam_clap``).

One model covers the paper's four variants; the config selects the parts:

=============  =============  ==========================  ======================
variant        model.target   model.classification_branch  criterion.lambda_cls
=============  =============  ==========================  ======================
MAM            pixel          false                        0
MAM-CLAP       clap           false                        0
SupMAM         pixel          true                         0.01
SupMAM-CLAP    clap           true                         1e-4
=============  =============  ==========================  ======================

Forward pass (B clips, N = t * f patches, N_vis visible):
    source (B, 1, T, 128) -> encoder on visible patches -> z (B, 1 + N_vis, D)
    z[:, 1:] -> window decoder with mask tokens -> (B, N, D_dec) -> head h -> pred (B, N, C)
    mean(z[:, 1:]) -> Linear -> BatchNorm -> ReLU -> Linear -> logits (B, K)
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, register_model

from ..modules.decoder import WindowDecoder
from ..modules.encoder import PATCH_SIZE, AudioEncoder
from ..modules.precision import Fp32BatchNorm1d
from ..optim import set_overrides
from .encoder_config import EncoderConfig

TARGET_CHOICES = ChoiceEnum(["pixel", "clap"])


@dataclass
class SupMamClapConfig(EncoderConfig):
    mask_ratio: float = field(
        default=0.8, metadata={"help": "fraction gamma of patches masked (MAM 0.8, CLAP variants 0.2, SupMAM 0.4)"}
    )
    decoder_embed_dim: int = field(default=512, metadata={"help": "decoder width"})
    decoder_layers: int = field(default=1, metadata={"help": "decoder blocks (paper: 1; AudioMAE: 16)"})
    decoder_attention_heads: int = field(default=16, metadata={"help": "decoder heads"})
    decoder_window_time: int = field(default=4, metadata={"help": "local-attention window, time patches"})
    decoder_window_freq: int = field(default=4, metadata={"help": "local-attention window, frequency patches"})
    decoder_shift_time: int = field(
        default=2, metadata={"help": "window shift in time patches, applied by every other block, first included"}
    )
    decoder_shift_freq: int = field(default=0, metadata={"help": "window shift in frequency patches"})
    target: TARGET_CHOICES = field(  # type: ignore
        default="pixel",
        metadata={"help": "pixel: reconstruct masked fbank patches (MAM, SupMAM); clap: regress teacher tokens"},
    )
    target_dim: int = field(
        default=0, metadata={"help": "teacher token width for target=clap; 0 = read from the task's target store"}
    )
    classification_branch: bool = field(
        default=False, metadata={"help": "add the supervised branch (SupMAM, SupMAM-CLAP)"}
    )
    num_classes: int = field(default=0, metadata={"help": "classes of the branch; 0 = read from the task's class list"})
    cls_hidden_dim: int = field(default=768, metadata={"help": "hidden width of the 2-layer classification MLP"})


class ClassificationHead(nn.Module):
    """Global average pool of visible tokens, then Linear -> BatchNorm (float32) -> ReLU -> Linear."""

    def __init__(self, dim: int, hidden: int, num_classes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), Fp32BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N_vis, D) visible encoder features -> logits (B, K)."""
        return self.mlp(tokens.mean(dim=1))


def patchify(source: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, F) -> (B, N, 256), time-major patches, each flattened row by row."""
    B, _, T, F = source.shape
    t, f = T // PATCH_SIZE, F // PATCH_SIZE
    x = source.reshape(B, t, PATCH_SIZE, f, PATCH_SIZE).permute(0, 1, 3, 2, 4)
    return x.reshape(B, t * f, PATCH_SIZE * PATCH_SIZE)


@register_model("supmam_clap", dataclass=SupMamClapConfig)
class SupMamClapModel(BaseFairseqModel):
    def __init__(self, cfg: SupMamClapConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = AudioEncoder.from_model_config(cfg)
        window = (cfg.decoder_window_time, cfg.decoder_window_freq)
        if self.encoder.grid_time % window[0] or self.encoder.grid_freq % window[1]:
            raise ValueError(
                f"model.max_frames={cfg.max_frames} gives a {self.encoder.grid_time}x{self.encoder.grid_freq} patch "
                f"grid that the decoder window {window[0]}x{window[1]} (model.decoder_window_time/freq) does not "
                f"tile: max_frames and task.target_length must be multiples of {PATCH_SIZE * window[0]} frames"
            )
        set_overrides(self.encoder.cls_token, weight_decay=0.0)  # no decay on tokens (the position tables are buffers)
        self.decoder = WindowDecoder(
            cfg.encoder_embed_dim,
            cfg.decoder_embed_dim,
            cfg.decoder_layers,
            cfg.decoder_attention_heads,
            window=(cfg.decoder_window_time, cfg.decoder_window_freq),
            shift=(cfg.decoder_shift_time, cfg.decoder_shift_freq),
            grid_time=self.encoder.grid_time,
            grid_freq=self.encoder.grid_freq,
            mlp_ratio=cfg.mlp_ratio,
        )
        if cfg.target == "clap":
            if cfg.target_dim <= 0:
                raise ValueError(
                    "model.target=clap needs teacher targets: set task.target_store (offline) or "
                    "task.teacher_checkpoint (online), or model.target_dim > 0"
                )
            self.head = nn.Sequential(nn.Linear(cfg.decoder_embed_dim, cfg.target_dim), nn.LayerNorm(cfg.target_dim))
        else:
            self.head = nn.Linear(cfg.decoder_embed_dim, PATCH_SIZE * PATCH_SIZE)
        self.classifier = None
        if cfg.classification_branch:
            if cfg.num_classes <= 0:
                raise ValueError(
                    "model.classification_branch=true needs class labels: set task.labels (and the class list) "
                    "or model.num_classes"
                )
            self.classifier = ClassificationHead(cfg.encoder_embed_dim, cfg.cls_hidden_dim, cfg.num_classes)

    @classmethod
    def build_model(cls, cfg: SupMamClapConfig, task=None):
        """target_dim / num_classes come filled in by the task (see its build_model)."""
        return cls(cfg)

    def forward(self, source: torch.Tensor, mask_ratio: float | None = None):
        """
        Args:
            source: (B, 1, T, 128) normalised fbank.
            mask_ratio: override of ``cfg.mask_ratio``.
        Returns dict:
            ``pred``: (B, N, C) head output for every patch (C = target_dim or 256);
            ``mask``: (B, N) bool, True = masked;
            ``logits``: (B, K) or None;
            ``patches``: (B, N, 256) input patches (target=pixel only).
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        grid = self.encoder.grid(source.shape[2])
        z, masking = self.encoder(source, ratio)
        if masking is None:  # ratio 0: every token visible, identity order
            n = grid[0] * grid[1]
            ids = torch.arange(n, device=source.device).expand(source.shape[0], -1)
            mask = torch.zeros(source.shape[0], n, dtype=torch.bool, device=source.device)
        else:
            ids, mask = masking.ids_restore, masking.mask
        visible = z[:, 1:]
        out = {
            "pred": self.head(self.decoder(visible, ids, grid)),
            "mask": mask,
            "logits": self.classifier(visible) if self.classifier is not None else None,
        }
        if self.cfg.target == "pixel":
            out["patches"] = patchify(source)
        return out

    def extract_features(self, source: torch.Tensor, layer: int | None = None):
        """Unmasked encoder features; see :meth:`AudioEncoder.extract_features`.

        ``layer`` (optional) selects one entry of ``layer_results`` as ``x``.
        """
        res = self.encoder.extract_features(source)
        if layer is not None:
            res["x"] = res["layer_results"][layer]
        return res

    def remove_pretraining_modules(self) -> None:
        """Drop everything but the encoder (for fine-tuning and feature extraction)."""
        self.decoder = None
        self.head = None
        self.classifier = None
