"""The encoder's config fields, one dataclass shared by the pretraining model
(``supmam_clap``) and the fine-tuning model (``mam_clap_classifier``).

Pretraining builds :class:`~mam_clap_plugin.modules.encoder.AudioEncoder` from these
fields. Fine-tuning builds it from them only for a random initialisation; with
``model.model_path`` set, the file's architecture overwrites them (so a fine-tuned
checkpoint rebuilds without the pretraining file).
"""
from dataclasses import dataclass, field, fields

from fairseq.dataclass import FairseqDataclass


@dataclass
class EncoderConfig(FairseqDataclass):
    encoder_embed_dim: int = field(default=768, metadata={"help": "encoder width (ViT-B: 768)"})
    encoder_layers: int = field(default=12, metadata={"help": "encoder blocks (ViT-B: 12)"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "encoder heads (ViT-B: 12)"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP width as a multiple of the block width"})
    max_frames: int = field(
        default=1024, metadata={"help": "longest input in fbank frames; sets the position-table grid (1024 -> 64x8)"}
    )


#: The encoder's shape fields, in :class:`EncoderConfig` order.
ARCHITECTURE = tuple(f.name for f in fields(EncoderConfig) if not f.name.startswith("_"))  # not fairseq's _name
