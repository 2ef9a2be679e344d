"""SupMAM-CLAP pretraining model (registered as ``supmam_clap``).

One model covers the paper's four variants; the config selects the parts:

=============  ============  ======================  ===========  ======================  ==================
variant        model.target  classification_branch   lambda_cls   decoder (blocks/width)  visible_prediction
=============  ============  ======================  ===========  ======================  ==================
MAM            pixel         false                   0            16 / 512                decoder
MAM-CLAP       clap          false                   0            1 / 768 (the encoder)   encoder
SupMAM         pixel         true                    0.01         16 / 512                decoder
SupMAM-CLAP    clap          true                    1e-4         1 / 768 (the encoder)   encoder
=============  ============  ======================  ===========  ======================  ==================

(``criterion.lambda_cls``; every decoder uses AudioMAE's Swin V2 block, ``model.decoder_block=swinv2``,
with 4x4 windows shifted by (2, 0); see :mod:`mam_clap_plugin.modules.decoder`.)

Forward pass (B clips, N = t * f patches, N_vis visible):
    source (B, 1, T, 128) -> encoder on visible patches -> z (B, 1 + N_vis, D)
    Z_v = z[:, 1:] -> window decoder with mask tokens -> (B, N, D_dec)
    head h -> pred (B, N, C), token by token:
        masked patches: Y_m = h(decoder output);
        visible patches: Y_v = h(Z_v) (``visible_prediction=encoder``) or h(decoder output) (``decoder``)
    mean(Z_v) -> Linear -> BatchNorm -> ReLU -> Linear -> logits (B, K)

**Visible predictions** (``model.visible_prediction``). The paper: "The decoder g(.) predicts
the latent representations Z_m for the masked patches from mask tokens E_m, conditioned on
the visible latent representation Z_v. After that, the predictions of visible patches Y_v
and masked patches Y_m are obtained via a head h(.)". So ``encoder`` takes Y_v = h(Z_v)
straight from the encoder (feature distillation of the visible tokens, as in CAE v2, the
paper's [3]); the decoder's output at visible positions is not used. One head h serves both
sets, so Z_v and the decoder output need one width: the CLAP configs run the decoder at the
encoder's width (``decoder_embed_dim: 768``), and the model refuses ``encoder`` when the two
widths differ. ``decoder`` passes every token through the decoder, then h. The pixel
variants use ``decoder``: AudioMAE's loss is on masked patches only, so visible predictions
are never used there (``encoder`` with ``target=pixel`` is refused).

**Starting from released weights** (``model.encoder_init``): the task loads the encoder of
that file (any file :func:`~mam_clap_plugin.checkpoint.load_encoder` reads) strictly into a
new model, whose decoder and heads stay freshly initialised; see
:meth:`SupMamClapModel.init_encoder`. A checkpoint that fairseq then loads to resume
(``checkpoint_last.pt``) replaces those weights.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, register_model

from ..modules.decoder import DECODER_BLOCKS, WindowDecoder, saved_block_kind
from ..modules.encoder import MODEL_CONFIG_FIELDS, PATCH_SIZE, AudioEncoder
from ..modules.precision import Fp32BatchNorm1d
from ..optim import set_overrides
from .encoder_config import EncoderConfig

logger = logging.getLogger(__name__)

TARGET_CHOICES = ChoiceEnum(["pixel", "clap"])
VISIBLE_PREDICTION_CHOICES = ChoiceEnum(["encoder", "decoder"])
DECODER_BLOCK_CHOICES = ChoiceEnum(list(DECODER_BLOCKS))


@dataclass
class SupMamClapConfig(EncoderConfig):
    mask_ratio: float = field(
        default=0.8, metadata={"help": "fraction gamma of patches masked (MAM 0.8, CLAP variants 0.2, SupMAM 0.4)"}
    )
    decoder_embed_dim: int = field(
        default=512,
        metadata={"help": "decoder width (AudioMAE: 512); must equal encoder_embed_dim with visible_prediction=encoder "
                          "(one head h for Y_v and Y_m): the CLAP configs use 768"},
    )
    decoder_layers: int = field(default=1, metadata={"help": "decoder blocks (paper: 1; AudioMAE: 16)"})
    decoder_attention_heads: int = field(default=16, metadata={"help": "decoder heads; must divide decoder_embed_dim"})
    decoder_block: DECODER_BLOCK_CHOICES = field(  # type: ignore
        default="swinv2",
        metadata={"help": "swinv2: AudioMAE's decoder block (Swin V2: post-norm, scaled cosine attention, log-spaced "
                          "continuous position bias; the paper's framework, hence the default); vit: pre-norm ViT "
                          "block, dot-product attention, no position bias"},
    )
    decoder_window_time: int = field(default=4, metadata={"help": "local-attention window, time patches"})
    decoder_window_freq: int = field(default=4, metadata={"help": "local-attention window, frequency patches"})
    decoder_shift_time: int = field(
        default=2,
        metadata={"help": "window shift in time patches; blocks alternate plain/shifted ending with a shifted one "
                          "(16 blocks: AudioMAE's order, first plain; 1 block: the paper's shifted block)"},
    )
    decoder_shift_freq: int = field(default=0, metadata={"help": "window shift in frequency patches"})
    visible_prediction: VISIBLE_PREDICTION_CHOICES = field(  # type: ignore
        default="decoder",
        metadata={"help": "where Y_v comes from (target=clap): encoder = h(Z_v), the visible encoder output (the "
                          "paper; needs decoder_embed_dim == encoder_embed_dim); decoder = h(decoder output) for "
                          "every token. The CLAP configs set encoder; target=pixel needs decoder (masked-only loss)"},
    )
    encoder_init: Optional[str] = field(
        default=None,
        metadata={"help": "start pretraining from this file's encoder (a converted AudioMAE file, an encoder "
                          "export, or a pretraining/fine-tuning checkpoint of this plugin), loaded strictly; the "
                          "decoder and heads start fresh. The encoder_* fields must match the file. An existing "
                          "checkpoint_last.pt (resuming) replaces it"},
    )
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
        if cfg.visible_prediction == "encoder":
            if cfg.target != "clap":
                raise ValueError(
                    f"model.visible_prediction=encoder needs model.target=clap: with target={cfg.target} the loss is "
                    "on masked patches only, so visible predictions are never used; "
                    "set model.visible_prediction=decoder"
                )
            if cfg.decoder_embed_dim != cfg.encoder_embed_dim:
                raise ValueError(
                    f"model.visible_prediction=encoder applies one head h to the encoder output Z_v "
                    f"(model.encoder_embed_dim={cfg.encoder_embed_dim}) and to the decoder output "
                    f"(model.decoder_embed_dim={cfg.decoder_embed_dim}): set model.decoder_embed_dim="
                    f"{cfg.encoder_embed_dim}, or model.visible_prediction=decoder"
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
            block=str(cfg.decoder_block),
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
        """target_dim / num_classes come filled in by the task (see its build_model), which also
        applies ``model.encoder_init`` (:meth:`init_encoder`) to a new run's model."""
        return cls(cfg)

    def init_encoder(self, path: str) -> Tuple[float, float]:
        """Load the encoder of ``path`` (any file :func:`~mam_clap_plugin.checkpoint.load_encoder`
        reads) strictly into this model; the decoder and heads keep their fresh initialisation.
        Returns the fbank normalisation ``(mean, std)`` the file's encoder was trained with.

        Raises ValueError naming the fields when the file's encoder differs from the
        ``model.encoder_*`` fields (a converted ViT-B AudioMAE file needs the paper's ViT-B:
        768 dims, 12 layers, 12 heads, 1024 frames).
        """
        from ..checkpoint import load_encoder_with_stats  # reads files: imported only when used

        bundle = load_encoder_with_stats(path)
        loaded = bundle.encoder
        want = self.encoder.config
        diff = [f"model.{name}={getattr(self.cfg, name)} but the file's encoder has {loaded.config[arg]}"
                for name, arg in MODEL_CONFIG_FIELDS.items() if loaded.config[arg] != want[arg]]
        if loaded.config["num_mel_bins"] != want["num_mel_bins"]:
            diff.append(f"{loaded.config['num_mel_bins']} mel bins, not {want['num_mel_bins']}")
        if not loaded.config["final_norm"]:
            diff.append("no final LayerNorm (a fine-tuned encoder: AudioMAE's fine-tuned files pool before fc_norm); "
                        "start from a pretraining file")
        if diff:
            raise ValueError(f"model.encoder_init={path}: the encoder does not match this model: " + "; ".join(diff))
        self.encoder.load_state_dict(loaded.state_dict(), strict=True)
        logger.info(
            f"model.encoder_init: encoder weights from {path} ({want['depth']} blocks, width {want['embed_dim']}); "
            "decoder and heads freshly initialised. If a checkpoint is loaded next to resume (checkpoint_last.pt in "
            "checkpoint.save_dir, or checkpoint.restore_file), its weights replace these."
        )
        return bundle.norm_mean, bundle.norm_std

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's load (resuming, or loading a saved model): refuses a decoder built from the
        other block kind, naming the field, and says when it replaces ``model.encoder_init``'s
        weights."""
        saved = saved_block_kind(state_dict)
        if saved is not None and saved != self.cfg.decoder_block:
            raise ValueError(
                f"the checkpoint's decoder is built from {saved!r} blocks, this model from "
                f"model.decoder_block={self.cfg.decoder_block!r}. Resume with model.decoder_block={saved}, or load "
                f"with arg_overrides={{'decoder_block': '{saved}'}} (a checkpoint saved before the field existed "
                "holds 'vit' blocks)"
            )
        if self.cfg.encoder_init:
            logger.info(f"loading a checkpoint's weights: they replace the encoder from model.encoder_init="
                        f"{self.cfg.encoder_init} (resuming wins over encoder_init)")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def forward(self, source: torch.Tensor, mask_ratio: float | None = None):
        """
        Args:
            source: (B, 1, T, 128) normalised fbank.
            mask_ratio: override of ``cfg.mask_ratio``.
        Returns dict:
            ``pred``: (B, N, C) head output for every patch (C = target_dim or 256), in grid
                order; at visible patches from the encoder output with ``visible_prediction=encoder``;
            ``mask``: (B, N) bool, True = masked;
            ``logits``: (B, K) or None;
            ``patches``: (B, N, 256) input patches (target=pixel only).
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        grid = self.encoder.grid(source.shape[2])
        z, masking = self.encoder(source, ratio)
        if masking is None:  # ratio 0: every token visible, identity order
            n = grid[0] * grid[1]
            ids = ids_keep = torch.arange(n, device=source.device).expand(source.shape[0], -1)
            mask = torch.zeros(source.shape[0], n, dtype=torch.bool, device=source.device)
        else:
            ids, ids_keep, mask = masking.ids_restore, masking.ids_keep, masking.mask
        visible = z[:, 1:]
        tokens = self.decoder(visible, ids, grid)  # (B, N, D_dec), grid order
        if self.cfg.visible_prediction == "encoder":
            # Y_v = h(Z_v): the encoder's visible tokens written over the decoder's output at their
            # grid positions (fixed shapes, no boolean indexing: no host sync)
            tokens = tokens.scatter(1, ids_keep.unsqueeze(-1).expand_as(visible), visible)
        out = {
            "pred": self.head(tokens),
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
