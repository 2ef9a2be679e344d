"""A frozen CLAP audio tower (HTS-AT) as a teacher producing token maps.

``load_clap_teacher(path)`` reads a LAION-CLAP or MS-CLAP (2023) checkpoint, infers the HTS-AT
size from the tensor shapes, loads every audio weight strictly and returns a :class:`ClapTeacher`
(the teacher contract of :mod:`.base`; :func:`mam_clap_plugin.teacher.load_teacher` picks this
loader, or the caption teachers' of :mod:`.caption`, which shares :func:`build_audio_branch`):

    wav (B, num_samples) float32 -> (B, grid_freq, grid_time, dim) float32

``layer="final"``: tokens after the last stage and ``norm``, (2, 32, C) (C = 768 tiny, 1024 base),
optionally through the CLAP audio projection per token (512 LAION, 1024 MS-CLAP).
``layer="stage3"``: output of the third stage's blocks, before its PatchMerging, (4, 64, C/2).
Frequency cells run low to high; time index = chunk * width + column (4 chunks of 2.5 s for LAION).

Front end (weights from the checkpoint, as torchlibrosa builds them):
    wav -> reflect pad n_fft/2 -> conv1d with the windowed DFT rows ``conv_real``/``conv_imag``
    (513, 1, n_fft), stride hop -> power re^2 + im^2 (B, 1, T, 513) -> @ melW (513, 64)
    -> 10 log10(max(x, 1e-10)) -> bn0 (BatchNorm over mel bins) -> HTS-AT.

LAION-CLAP (``{"state_dict": {"module.audio_branch.*", "module.audio_projection.*", text keys}}``,
"module." optional, a bare state dict accepted as LAION's own loader does): 48 kHz, 10 s,
n_fft 1024 (from the weights), hop 480, 64 mels over 50-14000 Hz.

MS-CLAP 2023 (``{"model": {"audio_encoder.base.htsat.*", "audio_encoder.projection.*",
"caption_encoder.*", "logit_scale"}}``): msclap's ``CLAPWrapper`` feeds 7 s of 44.1 kHz audio
(``configs/config_2023.yml``: sampling_rate 44100, duration 7), but its ``HTSATWrapper`` builds
the HTS-AT front end from ``msclap/models/config.py`` and ignores the yml's audio settings:
n_fft 1024, hop 320, 64 mels over 50-14000 Hz for a nominal 32 kHz. The mel filters therefore sit
at 44100/32000 times their nominal frequencies in the real audio: 68.9-19294 Hz.
:attr:`ClapTeacher.fmin`/``fmax`` and :meth:`ClapTeacher.freq_edges_hz` give those real
frequencies.

Keys outside the audio tower (text branch, ``logit_scale*``, LAION's ``audio_transform`` /
``text_transform`` heads used only by its training loss) are ignored. The audio-tagging head of
HTS-AT (``tscam_conv.*``, ``head.*``) is not a module here: those keys are explicitly named and
skipped. Every other audio key must match the module tree exactly.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from ..files import CheckpointError, numpy_scalar_globals, read_torch_file
from .base import LAYERS
from .htsat import HTSAT, fold_spectrogram

__all__ = ["LAYERS", "AudioBranch", "ClapCheckpointError", "ClapTeacher", "FrontEnd", "load_clap_teacher"]
#: HTS-AT tagging-head keys present in CLAP checkpoints and deliberately not loaded.
IGNORED_AUDIO_KEYS = ("tscam_conv.weight", "tscam_conv.bias", "head.weight", "head.bias")
_FUSION_KEY = re.compile(r"(^|\.)(mel_conv1d|mel_conv2d|fusion_model)\.")
SIZES = {"tiny": (96, (2, 2, 6, 2)), "base": (128, (2, 2, 12, 2)), "large": (256, (2, 2, 12, 2))}
HEADS = (4, 8, 16, 32)


class ClapCheckpointError(CheckpointError):
    """A file is not a usable (non-fusion LAION-CLAP or MS-CLAP 2023) CLAP checkpoint."""


@dataclass(frozen=True)
class FrontEnd:
    """Fixed front-end settings of a checkpoint layout (n_fft and mel_bins come from the weights)."""
    sample_rate: int  # of the input waveform
    seconds: float
    hop: int
    fmin: float  # nominal filterbank limits, in Hz at ``filterbank_rate``
    fmax: float
    filterbank_rate: int  # sample rate the mel filterbank was built for


@dataclass(frozen=True)
class Layout:
    name: str  # "laion" | "msclap"
    audio_prefix: str  # prefix of the HTS-AT keys
    projection_prefix: str
    model_prefix: str  # of ClapTeacher.name
    front_end: FrontEnd


LAYOUTS = {
    "laion": Layout("laion", "audio_branch.", "audio_projection.", "laion-clap-htsat",
                    FrontEnd(48000, 10.0, 480, 50.0, 14000.0, 48000)),
    "msclap": Layout("msclap", "audio_encoder.base.htsat.", "audio_encoder.projection.", "ms-clap-2023-htsat",
                     FrontEnd(44100, 7.0, 320, 50.0, 14000.0, 32000)),
}


# --------------------------------------------------------------------------------------------
# Mel scale


def hz_to_mel(f: float | Tensor) -> float | Tensor:
    """Slaney mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    if isinstance(f, Tensor):
        return torch.where(f >= min_log_hz, min_log_mel + torch.log(f.clamp(min=min_log_hz) / min_log_hz) / logstep,
                           f / f_sp)
    return min_log_mel + math.log(f / min_log_hz) / logstep if f >= min_log_hz else f / f_sp


def mel_to_hz(m: float | Tensor) -> float | Tensor:
    """Inverse of :func:`hz_to_mel`."""
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    if isinstance(m, Tensor):
        return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)
    return min_log_hz * math.exp(logstep * (m - min_log_mel)) if m >= min_log_mel else f_sp * m


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> Tensor:
    """(n_fft // 2 + 1, n_mels) float32 Slaney-normalised triangular filters on the Slaney mel scale,
    as ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax).T`` (torchaudio's ``melscale_fbanks``)."""
    return torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, float(fmin), float(fmax), n_mels, sample_rate,
                                                norm="slaney", mel_scale="slaney")


def dft_weights(n_fft: int) -> tuple[Tensor, Tensor]:
    """Hann-windowed (periodic) DFT rows as conv1d weights, each (n_fft // 2 + 1, 1, n_fft) float32:
    real = cos(2 pi k n / N) w[n], imag = -sin(2 pi k n / N) w[n] (torchlibrosa's ``STFT``)."""
    n = torch.arange(n_fft, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    phase = 2 * math.pi * ((k[:, None] * n[None, :]) % n_fft) / n_fft
    real = (torch.cos(phase) * window)[:, None, :].float()
    imag = (-torch.sin(phase) * window)[:, None, :].float()
    return real, imag


# --------------------------------------------------------------------------------------------
# Front end and the audio tower


class DFTConv(nn.Module):
    """The two conv1d filter banks of torchlibrosa's STFT (weights only; see SpectrogramExtractor)."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.conv_real = nn.Conv1d(1, n_fft // 2 + 1, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, n_fft // 2 + 1, n_fft, stride=hop, bias=False)


class SpectrogramExtractor(nn.Module):
    """Power spectrogram: wav (B, L) -> (B, 1, 1 + L // hop, n_fft // 2 + 1), centred frames."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop = hop
        self.stft = DFTConv(n_fft, hop)

    def forward(self, wav: Tensor) -> Tensor:
        x = F.pad(wav[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        weight = torch.cat([self.stft.conv_real.weight, self.stft.conv_imag.weight]).to(x.dtype)
        real, imag = F.conv1d(x, weight, stride=self.hop).chunk(2, dim=1)  # each (B, n_freq, T)
        return (real.square() + imag.square()).transpose(1, 2)[:, None]


class LogmelExtractor(nn.Module):
    """(B, 1, T, n_freq) power -> (B, 1, T, mel_bins) dB (ref 1.0, amin 1e-10, no top_db)."""

    def __init__(self, n_fft: int, mel_bins: int):
        super().__init__()
        self.melW = nn.Parameter(torch.zeros(n_fft // 2 + 1, mel_bins))

    def forward(self, x: Tensor) -> Tensor:
        return 10.0 * torch.log10(torch.clamp(x @ self.melW.to(x.dtype), min=1e-10))


class AudioBranch(HTSAT):
    """HTS-AT with its front end; parameter names match the checkpoints' audio-branch keys.

    wav (B, L) -> map (B, grid_freq, grid_time, width) (see :meth:`HTSAT.forward`).
    """

    def __init__(self, embed_dim: int, depths, num_heads, window: int = 8, patch_size: int = 4,
                 n_fft: int = 1024, hop: int = 480, mel_bins: int = 64):
        super().__init__(embed_dim, tuple(depths), tuple(num_heads), window, patch_size, mel_bins)
        self.spectrogram_extractor = SpectrogramExtractor(n_fft, hop)
        self.logmel_extractor = LogmelExtractor(n_fft, mel_bins)
        self.bn0 = nn.BatchNorm2d(mel_bins)

    def init_front_end(self, sample_rate: int, fmin: float, fmax: float) -> None:
        """Fill the STFT rows (Hann-windowed DFT) and the Slaney mel filterbank (``fmin``-``fmax`` Hz at
        ``sample_rate``) as torchlibrosa builds them, and freeze both: what a new tower trains with.
        ``bn0`` (the per-mel-bin normalisation) stays trainable."""
        extractor = self.spectrogram_extractor
        real, imag = dft_weights(extractor.n_fft)
        with torch.no_grad():
            extractor.stft.conv_real.weight.copy_(real)
            extractor.stft.conv_imag.weight.copy_(imag)
            self.logmel_extractor.melW.copy_(mel_filterbank(sample_rate, extractor.n_fft, self.mel_bins, fmin, fmax))
        extractor.requires_grad_(False)
        self.logmel_extractor.requires_grad_(False)

    def log_mel(self, wav: Tensor) -> Tensor:
        """wav (B, L) -> normalised log-mel (B, 1, T, mel_bins)."""
        x = self.logmel_extractor(self.spectrogram_extractor(wav))
        return self.bn0(x.transpose(1, 3)).transpose(1, 3)

    def encode(self, log_mel: Tensor) -> Tensor:
        """Normalised log-mel (B, 1, T, mel_bins) -> map (B, grid_freq, grid_time, width)."""
        return super().forward(fold_spectrogram(log_mel, self.mel_bins))

    def forward(self, wav: Tensor) -> Tensor:
        return self.encode(self.log_mel(wav))


class LaionProjection(nn.Sequential):
    """LAION-CLAP ``audio_projection``: Linear(C, 512) -> ReLU -> Linear(512, 512)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__(nn.Linear(dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim))
        self.out_dim = out_dim


class MsClapProjection(nn.Module):
    """MS-CLAP ``Projection``: e = W1 x; LayerNorm(e + W2 gelu(e)) (no biases; dropout off)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.linear1 = nn.Linear(dim, out_dim, bias=False)
        self.linear2 = nn.Linear(out_dim, out_dim, bias=False)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        e = self.linear1(x)
        return self.layer_norm(e + self.linear2(F.gelu(e)))


_PROJECTIONS = {"laion": LaionProjection, "msclap": MsClapProjection}


# --------------------------------------------------------------------------------------------
# The teacher


class ClapTeacher(nn.Module):
    """A frozen HTS-AT CLAP audio tower: wav (B, num_samples) -> token map (B, grid_freq, grid_time, dim).

    Always in eval mode (``train()`` is a no-op) with ``requires_grad=False`` everywhere; the
    forward runs under ``torch.no_grad()`` and only the stages it needs. The STFT, power, mel,
    log and first BatchNorm always run in float32 (the power spectrum exceeds fp16's range);
    the transformer runs in float32, or under autocast to ``autocast_dtype`` (bfloat16 or
    float16) when that is set. The map is returned in float32.
    Build it with :func:`mam_clap_plugin.teacher.load_teacher` (any registered format) or
    :func:`load_clap_teacher`.
    """

    autocast_dtype: torch.dtype | None = None

    def __init__(self, branch: AudioBranch, projection: nn.Module | None, *, name: str, layout: str,
                 layer: str, front_end: FrontEnd):
        super().__init__()
        self.branch = branch
        self.proj = projection
        self.name = name
        self.layout = layout
        self.layer = layer
        self.projection = projection is not None
        self.sample_rate = front_end.sample_rate
        self.seconds = front_end.seconds
        self.num_samples = round(front_end.seconds * front_end.sample_rate)
        self.mel_bins = branch.mel_bins
        self._front_end = front_end
        self._hz_scale = front_end.sample_rate / front_end.filterbank_rate
        self.fmin = front_end.fmin * self._hz_scale
        self.fmax = front_end.fmax * self._hz_scale
        if layer == "stage3":  # stage 3's blocks end the network: drop what is never run
            del branch.layers[3:]
            branch.layers[2].downsample = None
            branch.norm = None
        gf, gt, width = branch.stage_shape(len(branch.layers) - 1)
        self.grid = (gf, gt)
        self.dim = projection.out_dim if projection is not None else width
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "ClapTeacher":
        """Stays in eval mode whatever ``mode`` is (BatchNorm statistics and outputs are fixed)."""
        return super().train(False)

    def freq_edges_hz(self) -> list[float]:
        """grid_freq + 1 edges in Hz (of the input audio) of the map's frequency cells.

        Cell k covers mel bins [k M / G, (k + 1) M / G). The outer edges are the filterbank limits
        (fmin, fmax); an inner edge lies halfway, on the Slaney mel scale, between the centres of
        the last bin of one cell and the first bin of the next. For LAION's final map (G = 2) that
        is the mel midpoint of [fmin, fmax]. MS-CLAP's nominal 32 kHz edges are scaled by 44100/32000.
        """
        fe, M, G = self._front_end, self.mel_bins, self.grid[0]
        lo, hi = hz_to_mel(fe.fmin), hz_to_mel(fe.fmax)
        step = (hi - lo) / (M + 1)  # mel distance between adjacent bin centres
        mels = [lo] + [lo + (k * M / G + 0.5) * step for k in range(1, G)] + [hi]
        return [mel_to_hz(m) * self._hz_scale for m in mels]

    def forward(self, wav: Tensor) -> Tensor:
        if wav.dim() != 2 or wav.shape[1] != self.num_samples:
            raise ValueError(f"{self.name} expects (batch, {self.num_samples}) waveforms "
                             f"({self.seconds:g} s at {self.sample_rate} Hz), got {tuple(wav.shape)}")
        device = wav.device.type
        with torch.no_grad():
            with torch.autocast(device, enabled=False):
                log_mel = self.branch.log_mel(wav.float())
            dtype = self.autocast_dtype
            with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                x = self.branch.encode(log_mel)
                if self.proj is not None:
                    x = self.proj(x)
        return x.float()

    def extra_repr(self) -> str:
        return (f"name={self.name}, layer={self.layer}, projection={self.projection}, grid={self.grid}, "
                f"dim={self.dim}, sample_rate={self.sample_rate}, seconds={self.seconds:g}")


# --------------------------------------------------------------------------------------------
# Loading


TRUST_HINT = "trusted=True (task.teacher_trusted=true, extract_clap_targets.py --trusted)"


def read_teacher_file(path: str, trusted: bool = False, what: str = "CLAP checkpoint"):
    """The object a teacher checkpoint file holds: ``torch.load(weights_only=True)``, numpy scalars
    allowed; a file that needs more (arbitrary pickled objects) is refused unless ``trusted``, which
    unpickles it fully as LAION-CLAP's and MS-CLAP's own loaders do. Errors are
    :class:`ClapCheckpointError` naming the file."""
    return read_torch_file(path, trusted, safe_globals=numpy_scalar_globals(), error=ClapCheckpointError,
                           what=what, trust_hint=TRUST_HINT)


def clap_state_dict(ckpt) -> dict[str, Tensor] | None:
    """The model state dict of a CLAP checkpoint object (its ``state_dict`` or ``model`` entry, or the
    dict itself), "module." prefixes removed, tensors only; None if ``ckpt`` is not a dict."""
    if not isinstance(ckpt, dict):
        return None
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt.items()
            if isinstance(k, str) and isinstance(v, Tensor)}


def _read_state_dict(path: str, trusted: bool, checkpoint=None) -> dict[str, Tensor]:
    """The checkpoint's model state dict, "module." prefixes removed (``checkpoint``: the file's
    object when already read, see :func:`read_teacher_file`)."""
    ckpt = read_teacher_file(path, trusted) if checkpoint is None else checkpoint
    state = clap_state_dict(ckpt)
    if state is None:
        raise ClapCheckpointError(f"{path}: not a CLAP checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return state


def clap_layouts(state: dict[str, Tensor]) -> list[Layout]:
    """The layouts (LAION-CLAP, MS-CLAP) whose audio-tower prefix some key of ``state`` carries."""
    return [lay for lay in LAYOUTS.values() if any(k.startswith(lay.audio_prefix) for k in state)]


def _detect_layout(path: str, state: dict[str, Tensor]) -> Layout:
    found = clap_layouts(state)
    if len(found) != 1:
        sample = ", ".join(sorted(state)[:5]) or "no tensors"
        raise ClapCheckpointError(
            f"{path}: not a LAION-CLAP or MS-CLAP checkpoint (expected keys 'audio_branch.*' or "
            f"'audio_encoder.base.htsat.*'; found {len(state)} tensors: {sample}{', ...' if len(state) > 5 else ''})")
    layout = found[0]
    fusion = sorted(k for k in state if k.startswith(layout.audio_prefix) and _FUSION_KEY.search(k))
    proj_key = layout.audio_prefix + "patch_embed.proj.weight"
    if fusion or (proj_key in state and state[proj_key].shape[1] != 1):
        raise ClapCheckpointError(
            f"{path}: a feature-fusion CLAP checkpoint ({', '.join(fusion[:3]) or proj_key + ' with 4 channels'}"
            f"{', ...' if len(fusion) > 3 else ''}); only non-fusion checkpoints are supported")
    return layout


@dataclass(frozen=True)
class Architecture:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window: int
    patch_size: int
    n_fft: int
    mel_bins: int

    @property
    def size(self) -> str:
        for size, (embed, depths) in SIZES.items():
            if (self.embed_dim, self.depths, self.num_heads) == (embed, depths, HEADS):
                return size
        return (f"e{self.embed_dim}-d{''.join(map(str, self.depths))}"
                f"-h{'.'.join(map(str, self.num_heads))}")


def _infer_architecture(path: str, audio: dict[str, Tensor]) -> Architecture:
    """HTS-AT hyper-parameters from the audio-branch tensor shapes (keys without prefix)."""
    try:
        patch = audio["patch_embed.proj.weight"]  # (C0, 1, p, p)
        real = audio["spectrogram_extractor.stft.conv_real.weight"]  # (n_fft/2+1, 1, n_fft)
        mel = audio["logmel_extractor.melW"]  # (n_fft/2+1, mel_bins)
    except KeyError as e:
        raise ClapCheckpointError(f"{path}: HTS-AT audio tower lacks {e.args[0]!r}") from e
    stages: dict[int, int] = {}
    for k in audio:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            stages[i] = max(stages.get(i, 0), j + 1)
    if not stages or sorted(stages) != list(range(len(stages))):
        raise ClapCheckpointError(f"{path}: cannot infer the HTS-AT stages (blocks found in stages {sorted(stages)})")
    tables = [audio.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(len(stages))]
    for i, table in enumerate(tables):
        if table is None:
            raise ClapCheckpointError(f"{path}: stage {i} lacks a relative_position_bias_table")
    return Architecture(embed_dim=patch.shape[0], depths=tuple(stages[i] for i in range(len(stages))),
                        num_heads=tuple(t.shape[1] for t in tables),
                        window=(math.isqrt(tables[0].shape[0]) + 1) // 2, patch_size=patch.shape[-1],
                        n_fft=real.shape[-1], mel_bins=mel.shape[1])


def _load_strict(path: str, module: nn.Module, state: dict[str, Tensor], what: str,
                 ignored: tuple[str, ...] = ()) -> None:
    state = {k: v for k, v in state.items() if k not in ignored}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or bad_shape:
        def show(keys):
            return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "") if keys else "none"
        raise ClapCheckpointError(
            f"{path}: {what} does not match the module tree; missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shape mismatches: {show(bad_shape)}")
    module.load_state_dict(state, strict=True)


def check_layer(layer: str, projection: bool) -> None:
    """Raise ValueError for a ``layer`` / ``projection`` pair no HTS-AT teacher gives."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    if projection and layer != "final":
        raise ValueError("projection=True applies the CLAP audio projection and needs layer='final'")


def build_audio_branch(path: str, audio: dict[str, Tensor], front_end: FrontEnd, layer: str, what: str,
                       ignored: tuple[str, ...] = ()) -> tuple[AudioBranch, Architecture]:
    """The HTS-AT tower (with its front end) that the audio-tower tensors ``audio`` (keys without
    prefix) describe, loaded strictly, and its architecture: read from the shapes, hop from
    ``front_end``; a mel filterbank other than the front end's is warned about. Raises
    :class:`ClapCheckpointError`."""
    arch = _infer_architecture(path, audio)
    if layer == "stage3" and len(arch.depths) < 4:
        raise ClapCheckpointError(f"{path}: layer 'stage3' needs 4 HTS-AT stages, found {len(arch.depths)}")
    branch = AudioBranch(arch.embed_dim, arch.depths, arch.num_heads, arch.window, arch.patch_size,
                         arch.n_fft, front_end.hop, arch.mel_bins)
    _load_strict(path, branch, audio, what, ignored)
    _check_filterbank(path, front_end, branch, arch)
    return branch, arch


def load_clap_teacher(path: str, layer: str = "final", projection: bool = False, *,
                      trusted: bool = False, checkpoint=None) -> ClapTeacher:
    """Build a frozen :class:`ClapTeacher` from a LAION-CLAP or MS-CLAP 2023 checkpoint file.

    The file is read with ``torch.load(weights_only=True)``, numpy scalars allowed (no code
    from the file runs). A file that pickles other objects is refused unless ``trusted=True``,
    which unpickles it fully, as CLAP's own loaders do: a deliberate choice for files you trust.
    ``checkpoint``: the file's object when the caller has read it already (the teacher registry).

    Raises ValueError for a bad ``layer``/``projection`` pair and :class:`ClapCheckpointError`
    (naming the file) for a fusion checkpoint, another model's checkpoint or any audio key or
    shape that does not match the inferred HTS-AT.
    """
    check_layer(layer, projection)
    state = _read_state_dict(path, trusted, checkpoint)
    layout = _detect_layout(path, state)
    audio = {k[len(layout.audio_prefix):]: v for k, v in state.items() if k.startswith(layout.audio_prefix)}
    fe = layout.front_end
    branch, arch = build_audio_branch(path, audio, fe, layer, f"its '{layout.audio_prefix}*' tower",
                                      IGNORED_AUDIO_KEYS)

    # Any other audio key (e.g. an unknown 'audio_encoder.*' module) is an error too.
    if layout.name == "msclap":
        stray = sorted(k for k in state if k.startswith("audio_encoder.")
                       and not k.startswith((layout.audio_prefix, layout.projection_prefix)))
        if stray:
            raise ClapCheckpointError(f"{path}: unexpected audio keys: {', '.join(stray[:20])}")
    proj_module = None
    if projection:
        proj_state = {k[len(layout.projection_prefix):]: v for k, v in state.items()
                      if k.startswith(layout.projection_prefix)}
        out_key = "2.weight" if layout.name == "laion" else "linear2.weight"
        if out_key not in proj_state:
            raise ClapCheckpointError(f"{path}: no '{layout.projection_prefix}{out_key}' for projection=True")
        proj_module = _PROJECTIONS[layout.name](branch.num_features, proj_state[out_key].shape[0])
        _load_strict(path, proj_module, proj_state, f"its '{layout.projection_prefix}*' projection")
    return ClapTeacher(branch, proj_module, name=f"{layout.model_prefix}-{arch.size}", layout=layout.name,
                       layer=layer, front_end=fe)


def _check_filterbank(path: str, fe: FrontEnd, branch: AudioBranch, arch: Architecture) -> None:
    """Warn when the checkpoint's mel filterbank is not the one the front end's settings imply."""
    expected = mel_filterbank(fe.filterbank_rate, arch.n_fft, arch.mel_bins, fe.fmin, fe.fmax)
    melW = branch.logmel_extractor.melW.detach()
    err = (melW - expected).abs().max().item() / expected.abs().max().item()
    if err > 1e-3:
        warnings.warn(f"{path}: the mel filterbank differs from a {fe.fmin:g}-{fe.fmax:g} Hz Slaney filterbank "
                      f"at {fe.filterbank_rate} Hz (relative max difference {err:.2g}); freq_edges_hz may be off",
                      stacklevel=4)
