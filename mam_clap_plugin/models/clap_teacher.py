"""A CLAP model trained from captions, to serve as a teacher (registered as ``clap_teacher``).

Two towers map a clip and a caption into one embedding space, as LAION-CLAP does:

    wav (B, num_samples) at sample_rate -> audio_branch (the project's HTS-AT with its own front end,
        :class:`~mam_clap_plugin.teacher.clap.AudioBranch`) -> final map (B, Gf, Gt, C)
        -> mean over tokens -> audio_projection (Linear -> ReLU -> Linear) -> L2-normalised (B, E)
    captions -> tokenizer (sentencepiece, its bytes in the state dict) -> text_branch (transformer,
        :class:`~mam_clap_plugin.modules.text.TextTower`) -> text_projection -> L2-normalised (B, E)

with a learned temperature ``logit_scale`` (log of the logit scale; CLIP's init log(1/0.07),
clamped to ``logit_scale_max``). The audio-side key names are LAION-CLAP's (``audio_branch.*``,
``audio_projection.*``), so the saved checkpoint is read as a teacher by the same code that reads
LAION's weights (:mod:`mam_clap_plugin.teacher.caption`): its final map (2 x 32 x C for the
configs' sizes) is the token map the student regresses.

The front end (STFT rows, mel filterbank: ``sample_rate``, ``n_fft``, ``hop_length``, ``mel_bins``,
``fmin``-``fmax``) is built as torchlibrosa builds it and frozen; ``bn0`` trains and normalises with
the statistics of the global batch (every rank's clips, :class:`GlobalBatchNorm2d`). The front end
runs in float32 whatever the model's dtype under ``common.fp16`` / ``common.bf16``.
"""

import contextlib
import math
from dataclasses import dataclass, field, fields
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model

from ..modules.precision import KeepsFloat32, exact
from ..modules.text import SentencePieceTokenizer, TextTower
from ..optim import set_overrides
from ..teacher.clap import SIZES, AudioBranch, LaionProjection
from ..teacher.htsat import SPEC_SIZE

HTSAT_TINY_EMBED, HTSAT_TINY_DEPTHS = SIZES["tiny"]


@dataclass
class ClapTeacherConfig(FairseqDataclass):
    # audio tower: HTS-AT (defaults: HTSAT-tiny, LAION-CLAP's audio tower)
    audio_embed_dim: int = field(default=HTSAT_TINY_EMBED,
                                 metadata={"help": "HTS-AT stage-0 width (tiny 96, base 128)"})
    audio_depths: List[int] = field(default_factory=lambda: list(HTSAT_TINY_DEPTHS),
                                    metadata={"help": "HTS-AT blocks per stage (tiny [2,2,6,2])"})
    audio_num_heads: List[int] = field(default_factory=lambda: [4, 8, 16, 32],
                                       metadata={"help": "HTS-AT attention heads per stage"})
    audio_window: int = field(default=8, metadata={"help": "HTS-AT attention window side"})
    audio_patch_size: int = field(default=4, metadata={"help": "HTS-AT patch side on the 256x256 folded log-mel"})
    # front end (defaults: LAION-CLAP's)
    sample_rate: int = field(default=48000, metadata={"help": "input sample rate in Hz (clips are resampled to it)"})
    clip_seconds: float = field(default=10.0, metadata={"help": "seconds of each clip the model sees (the first ones, "
                                                                 "zero-padded); the teacher map covers them"})
    n_fft: int = field(default=1024, metadata={"help": "STFT size"})
    hop_length: int = field(default=480, metadata={"help": "STFT hop in samples"})
    mel_bins: int = field(default=64, metadata={"help": "mel bins (a divisor of 256: the folded image's side)"})
    fmin: float = field(default=50.0, metadata={"help": "lowest mel filter edge in Hz"})
    fmax: float = field(default=14000.0, metadata={"help": "highest mel filter edge in Hz (< sample_rate / 2)"})
    # text tower
    vocab_size: int = field(default=0, metadata={"help": "tokenizer vocabulary; 0 = read from the task's tokenizer"})
    text_embed_dim: int = field(default=512, metadata={"help": "text transformer width"})
    text_layers: int = field(default=6, metadata={"help": "text transformer blocks"})
    text_attention_heads: int = field(default=8, metadata={"help": "text transformer heads"})
    max_text_tokens: int = field(default=77, metadata={"help": "longest caption in tokens (longer ones are cut)"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "text MLP hidden width / text_embed_dim"})
    # shared space
    embed_dim: int = field(default=512, metadata={"help": "joint embedding width of both projections"})
    logit_scale_init: float = field(default=math.log(1 / 0.07),
                                    metadata={"help": "initial log logit scale (CLIP: log(1/0.07))"})
    logit_scale_max: float = field(default=math.log(100.0),
                                   metadata={"help": "the log logit scale is clamped to at most this (CLIP: log 100)"})


class GlobalBatchNorm2d(KeepsFloat32, nn.BatchNorm2d):
    """BatchNorm2d that normalises a training batch with the statistics of the global batch (the
    clips of every rank, all-reduced) and keeps its parameters, statistics and arithmetic in float32.

    In one process it is ``nn.BatchNorm2d``. In several, each rank's forward normalises with the
    mean and (biased) variance over all ranks' clips and updates the running statistics with them,
    as one process holding the whole batch would. The statistics carry no gradient: what feeds this
    layer (the frozen STFT and mel filterbank) trains nothing. State-dict keys are BatchNorm2d's.

    While :attr:`placeholder` is set (:func:`placeholder_batch`: a batch whose clips were all
    skipped), this rank's input is left out of the statistics: it is normalised with the other
    ranks' (which update the running statistics as on every rank), or, when no rank holds a real
    clip, with the running statistics, left unchanged.
    """

    #: the input is a placeholder: no clip of it enters the statistics
    placeholder: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        dist = torch.distributed
        several = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (several or (self.training and self.placeholder)):
            return super().forward(x)
        dims = (0, 2, 3)
        with torch.no_grad():
            weight = 0.0 if self.placeholder else 1.0
            count = torch.tensor([weight * x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
            total = torch.cat([weight * x.sum(dims), count])
            if several:
                dist.all_reduce(total)
            n = total[-1]
            real = not self.placeholder or bool(n.item())  # False: no real clip on any rank
            if real:
                mean = total[:-1] / n
                var = weight * (x - mean[None, :, None, None]).square().sum(dims)
                if several:
                    dist.all_reduce(var)
                var = var / n
                if self.track_running_stats:
                    m = self.momentum
                    self.running_mean.mul_(1 - m).add_(m * mean)
                    self.running_var.mul_(1 - m).add_(m * var * n / (n - 1).clamp(min=1))
                    self.num_batches_tracked.add_(1)
            else:  # the running statistics, left unchanged (the same on every rank)
                mean, var = self.running_mean, self.running_var
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


@contextlib.contextmanager
def placeholder_batch(model: nn.Module, placeholder: bool = True):
    """Within it, with ``placeholder``, the model's :class:`GlobalBatchNorm2d` layers leave this
    rank's input out of their statistics (the task's training step on a batch whose clips were all
    skipped)."""
    layers = [m for m in model.modules() if isinstance(m, GlobalBatchNorm2d)] if placeholder else []
    for m in layers:
        m.placeholder = True
    try:
        yield
    finally:
        for m in layers:
            m.placeholder = False


@register_model("clap_teacher", dataclass=ClapTeacherConfig)
class ClapTeacherModel(BaseFairseqModel):
    """Audio and text towers into one space (see the module docstring).

    ``tokenizer``: the sentencepiece model's bytes (a new model); a model rebuilt from a
    checkpoint gets them when its state dict is loaded.
    """

    def __init__(self, cfg: ClapTeacherConfig, tokenizer: bytes | torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        check_config(cfg)
        self.audio_branch = AudioBranch(cfg.audio_embed_dim, tuple(cfg.audio_depths), tuple(cfg.audio_num_heads),
                                        cfg.audio_window, cfg.audio_patch_size, cfg.n_fft, cfg.hop_length, cfg.mel_bins)
        self.audio_branch.bn0 = GlobalBatchNorm2d(cfg.mel_bins)
        self.audio_branch.init_front_end(cfg.sample_rate, cfg.fmin, cfg.fmax)
        self.audio_branch.apply(_init_swin)
        for m in self.audio_branch.modules():  # no weight decay on the relative position biases (as Swin)
            if hasattr(m, "relative_position_bias_table"):
                set_overrides(m.relative_position_bias_table, weight_decay=0.0)
        self.audio_projection = LaionProjection(self.audio_branch.num_features, cfg.embed_dim)
        self.text_branch = TextTower(cfg.vocab_size, cfg.text_embed_dim, cfg.text_layers, cfg.text_attention_heads,
                                     cfg.max_text_tokens, cfg.mlp_ratio)
        self.text_projection = LaionProjection(cfg.text_embed_dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.tokenizer = SentencePieceTokenizer(tokenizer)

    @classmethod
    def build_model(cls, cfg: ClapTeacherConfig, task=None):
        """``model.vocab_size`` comes filled in by the task (see its build_model), with the tokenizer's bytes."""
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be > 0: the clap_teacher task fills it from task.tokenizer")
        return cls(cfg, getattr(task, "tokenizer_bytes", None))

    @classmethod
    def from_config_dict(cls, model_cfg: dict, tokenizer=None) -> "ClapTeacherModel":
        """A model from a checkpoint's ``cfg.model`` dict (unknown keys such as ``_name`` ignored)."""
        names = {f.name for f in fields(ClapTeacherConfig)}
        return cls(ClapTeacherConfig(**{k: v for k, v in model_cfg.items() if k in names}), tokenizer)

    def _apply(self, fn, recurse=True):
        """fairseq's ``model.half()`` / bfloat16 cast leaves the frozen front end (STFT rows, mel
        filterbank) in float32: rebuilt exactly when a cast changed them."""
        super()._apply(fn, recurse)
        front = (self.audio_branch.spectrogram_extractor, self.audio_branch.logmel_extractor)
        cast = [p for m in front for p in m.parameters() if p.dtype != torch.float32]
        if cast:
            for p in cast:
                p.data = p.data.float()
            self.audio_branch.init_front_end(self.cfg.sample_rate, self.cfg.fmin, self.cfg.fmax)
        return self

    # ------------------------------------------------------------------------------ properties

    @property
    def num_samples(self) -> int:
        """Samples of the model's input: ``clip_seconds`` at ``sample_rate``."""
        return round(self.cfg.clip_seconds * self.cfg.sample_rate)

    # ------------------------------------------------------------------------------ towers

    def audio_map(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, num_samples) -> final HTS-AT map (B, grid_freq, grid_time, C): the teacher's tokens.

        The front end (STFT, power, mel, log, bn0) runs in float32 outside autocast; the rest in
        the model's dtype."""
        wav = exact(wav)
        if wav.dim() != 2 or wav.shape[1] != self.num_samples:
            raise ValueError(f"clap_teacher expects (batch, {self.num_samples}) waveforms ({self.cfg.clip_seconds:g} s "
                             f"at {self.cfg.sample_rate} Hz), got {tuple(wav.shape)}")
        with torch.autocast(wav.device.type, enabled=False):
            log_mel = self.audio_branch.log_mel(wav.float())
        return self.audio_branch.encode(log_mel.to(self.audio_branch.patch_embed.proj.weight.dtype))

    def encode_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, num_samples) -> (B, embed_dim) L2-normalised clip embeddings."""
        x = self.audio_projection(self.audio_map(wav).mean(dim=(1, 2)))
        return F.normalize(x.float(), dim=-1)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, embed_dim) L2-normalised caption embeddings (tokenised on the host)."""
        ids, valid = self.tokenizer(captions, self.cfg.max_text_tokens)
        device = self.logit_scale.device
        x = self.text_projection(self.text_branch(ids.to(device), valid.to(device)))
        return F.normalize(x.float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit scale exp(min(logit_scale, logit_scale_max)) (a float32 scalar)."""
        return self.logit_scale.float().clamp(max=self.cfg.logit_scale_max).exp()

    def forward(self, wav: torch.Tensor, captions: Sequence[str]) -> dict:
        """Returns ``{"audio": (B, E), "text": (B, E)}`` (L2-normalised, float32) and ``"scale"``, the logit scale."""
        return {"audio": self.encode_audio(wav), "text": self.encode_text(captions), "scale": self.scale()}


def check_config(cfg: ClapTeacherConfig) -> None:
    """Raise ValueError naming the ``model.*`` fields of an architecture HTS-AT cannot build."""
    if len(cfg.audio_depths) != len(cfg.audio_num_heads) or not cfg.audio_depths:
        raise ValueError(f"model.audio_depths {list(cfg.audio_depths)} and model.audio_num_heads "
                         f"{list(cfg.audio_num_heads)} must be non-empty lists of the same length")
    if cfg.mel_bins < 1 or SPEC_SIZE % cfg.mel_bins:
        raise ValueError(f"model.mel_bins={cfg.mel_bins} must divide {SPEC_SIZE} (the folded image's side)")
    side = SPEC_SIZE // cfg.audio_patch_size if cfg.audio_patch_size > 0 else 0
    final = side >> (len(cfg.audio_depths) - 1)
    ratio = SPEC_SIZE // cfg.mel_bins
    if side * cfg.audio_patch_size != SPEC_SIZE or final < 1 or final % ratio:
        raise ValueError(
            f"model.audio_patch_size={cfg.audio_patch_size} with {len(cfg.audio_depths)} stages gives a final map of "
            f"{final}x{final} tokens, which {ratio} time chunks (256 / model.mel_bins) do not split: use patch 4 with "
            "4 stages or patch 8 with 3 (a 2 x 32 map)")
    for i in range(len(cfg.audio_depths)):
        res = side >> i
        if res > cfg.audio_window and res % cfg.audio_window:
            raise ValueError(f"model.audio_window={cfg.audio_window} does not tile stage {i} ({res}x{res} tokens)")
    frames = 1 + cfg.sample_rate * cfg.clip_seconds // cfg.hop_length
    if frames > SPEC_SIZE * ratio:
        raise ValueError(f"model.clip_seconds={cfg.clip_seconds:g} at hop {cfg.hop_length} gives {frames:.0f} frames; "
                         f"HTS-AT folds at most {SPEC_SIZE * ratio}: raise model.hop_length or shorten the clip")
    if not 0 <= cfg.fmin < cfg.fmax <= cfg.sample_rate / 2:
        raise ValueError(f"need 0 <= model.fmin < model.fmax <= sample_rate / 2, got {cfg.fmin:g}, {cfg.fmax:g} "
                         f"at {cfg.sample_rate} Hz")


def _init_swin(m: nn.Module) -> None:
    """timm's Swin initialisation: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms;
    the relative position bias tables too (the patch convolution keeps torch's default)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif hasattr(m, "relative_position_bias_table"):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
