"""Audio loading and log-mel filterbank features (AudioMAE recipe).

Pipeline used for training, evaluation and normalisation statistics:

    load_audio(path, max_frames)            -> (S,) float32 mono waveform at 16 kHz
    wav_to_fbank(wav, target_length)        -> (target_length, 128) log-mel, zero-padded/cropped
    normalize_fbank(fbank, mean, std)       -> (fbank - mean) / (2 * std)

``write_wav(path, samples, rate)`` writes 16-bit PCM WAV files (generated data sets, benchmarks).

Frames are 25 ms windows every 10 ms (Kaldi ``snip_edges`` framing), so ``n`` frames need
``(n - 1) * 10 + 25`` ms of audio.
"""
from __future__ import annotations

import math
import os

import soundfile
import torch
import torchaudio

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
FRAME_SHIFT_MS = 10
WINDOW_MS = 25
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_MS // 1000  # 400

#: Keyword arguments of ``torchaudio.compliance.kaldi.fbank`` in :func:`wav_to_fbank`
#: (recorded in encoder exports as the front end the encoder expects).
FBANK_OPTIONS = {
    "htk_compat": True,
    "sample_frequency": SAMPLE_RATE,
    "use_energy": False,
    "window_type": "hanning",
    "num_mel_bins": NUM_MEL_BINS,
    "dither": 0.0,
    "frame_length": WINDOW_MS,
    "frame_shift": FRAME_SHIFT_MS,
}

#: Dataset name -> (mean, std) of the unnormalised, padded fbank (AudioMAE values).
NORM_STATS = {
    "audioset": (-4.2677393, 4.5689974),
    "esc50": (-6.6268077, 5.358466),
    "speech_commands": (-6.845978, 5.5654526),
}


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file (and the manifest line)."""


def _fail(path: str, where: str | None, problem: str) -> AudioError:
    """Build an AudioError whose message starts with ``where`` (if given) and the path."""
    prefix = f"{where}: " if where else ""
    return AudioError(f"{prefix}{path}: {problem}")


def _read(path: str, max_ms: int | None, where: str | None) -> tuple[torch.Tensor, int]:
    """Read the file (or its first ``max_ms`` milliseconds); returns ((S, C) float32, rate)."""
    if not os.path.isfile(path):
        raise _fail(path, where, "audio file not found")
    try:
        with soundfile.SoundFile(path) as sound:
            rate = sound.samplerate
            num = -1 if max_ms is None else -(-max_ms * rate // 1000)
            data = sound.read(frames=num, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as err:
        raise _fail(path, where, f"cannot read audio ({err})") from err
    return torch.from_numpy(data), rate


def _load_mono(path: str, max_ms: int | None, where: str | None) -> tuple[torch.Tensor, int]:
    """Mono float32 waveform at the file's own rate, checked; returns ((S,), rate)."""
    data, rate = _read(path, max_ms, where)
    if data.shape[0] == 0:
        raise _fail(path, where, "audio is empty (0 samples)")
    wav = data.mean(dim=1)
    if not torch.isfinite(wav).all():
        raise _fail(path, where, "audio contains NaN or Inf samples")
    return wav, rate


def _resample(wav: torch.Tensor, rate: int, target_rate: int) -> torch.Tensor:
    if rate != target_rate:
        wav = torchaudio.functional.resample(wav, rate, target_rate)
    return wav.contiguous()


def _frames_ms(num_frames: int) -> int:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return (num_frames - 1) * FRAME_SHIFT_MS + WINDOW_MS


def frames_to_samples(num_frames: int, sample_rate: int) -> int:
    """Number of samples at ``sample_rate`` needed for ``num_frames`` fbank frames (rounded up)."""
    return -(-_frames_ms(num_frames) * sample_rate // 1000)


def fit_length(wav: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Keep the first ``num_samples`` samples of (S,), zero-padding at the end if shorter."""
    if wav.shape[0] >= num_samples:
        return wav[:num_samples]
    return torch.nn.functional.pad(wav, (0, num_samples - wav.shape[0]))


def load_audio(path: str, max_frames: int | None = None, where: str | None = None) -> torch.Tensor:
    """Load a mono 16 kHz float32 waveform of shape (S,).

    Args:
        path: audio file readable by soundfile; channels are averaged, other sample rates
            are resampled with ``torchaudio.functional.resample``.
        max_frames: if given, read only the start of the file: the samples needed for this
            many fbank frames at the file's native rate (see ``frames_to_samples``).  Up to
            float rounding this does not change those frames: Kaldi fbank removes each
            frame's DC offset, so the waveform mean that ``wav_to_fbank`` subtracts cancels.
        where: location to prepend to error messages, e.g. ``"/data/train.tsv:12"``.

    Raises:
        AudioError: missing, unreadable, empty, or non-finite audio.
    """
    wav, rate = _load_mono(path, None if max_frames is None else _frames_ms(max_frames), where)
    return _resample(wav, rate, SAMPLE_RATE)


def load_teacher_audio(path: str, sample_rate: int, num_samples: int, where: str | None = None) -> torch.Tensor:
    """A teacher's input: the first ``num_samples`` samples at ``sample_rate``, (num_samples,)
    float32, zero-padded at the end like the student's fbank. Raises AudioError."""
    max_ms = -(-num_samples * 1000 // sample_rate)
    wav, rate = _load_mono(path, max_ms, where)
    return fit_length(_resample(wav, rate, sample_rate), num_samples)


def load_student_and_teacher_audio(path: str, max_frames: int, sample_rate: int, num_samples: int,
                                   where: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One read of the file for both inputs: ``load_audio(path, max_frames)`` and
    ``load_teacher_audio(path, sample_rate, num_samples)``."""
    max_ms = max(_frames_ms(max_frames), -(-num_samples * 1000 // sample_rate))
    wav, rate = _load_mono(path, max_ms, where)
    student = _resample(wav[: frames_to_samples(max_frames, rate)], rate, SAMPLE_RATE)
    return student, fit_length(_resample(wav, rate, sample_rate), num_samples)


def pad_or_crop(fbank: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad at the end or crop a (N, bins) fbank to (target_length, bins)."""
    missing = target_length - fbank.shape[0]
    if missing > 0:
        return torch.nn.functional.pad(fbank, (0, 0, 0, missing))
    return fbank[:target_length]


def wav_to_fbank(wav: torch.Tensor, target_length: int = 1024) -> torch.Tensor:
    """AudioMAE log-mel fbank of a 16 kHz waveform.

    Args:
        wav: (S,) float waveform at 16 kHz; shorter than one window (400 samples) is
            zero-padded (after mean removal) so that at least one frame exists.
        target_length: number of output frames; zero-pad at the end or crop.

    Returns:
        (target_length, 128) float32 unnormalised log-mel fbank.
    """
    if wav.dim() != 1:
        raise ValueError(f"wav_to_fbank expects a 1-D waveform (S,), got shape {tuple(wav.shape)}")
    if target_length < 1:
        raise ValueError(f"target_length must be >= 1, got {target_length}")
    wav = wav.float() - wav.float().mean()
    if wav.shape[0] < WINDOW_SAMPLES:
        wav = torch.nn.functional.pad(wav, (0, WINDOW_SAMPLES - wav.shape[0]))
    fbank = torchaudio.compliance.kaldi.fbank(wav[None], **FBANK_OPTIONS)
    return pad_or_crop(fbank, target_length)


def normalize_fbank(fbank: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """AudioMAE normalisation ``(fbank - mean) / (2 * std)``; any shape in, same shape out."""
    return (fbank - mean) / (2 * std)


def resolve_norm_stats(name_or_pair: str) -> tuple[float, float]:
    """Return (mean, std) for a NORM_STATS key (e.g. ``"audioset"``) or a ``"mean,std"`` string."""
    if name_or_pair in NORM_STATS:
        return NORM_STATS[name_or_pair]
    parts = name_or_pair.split(",")
    try:
        mean, std = (float(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"unknown normalisation stats {name_or_pair!r}: use one of "
            f"{', '.join(sorted(NORM_STATS))} or a 'mean,std' pair such as '-4.27,4.57'"
        ) from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"normalisation stats need a finite mean and std > 0, got {name_or_pair!r}")
    return mean, std


def write_wav(path, samples, sample_rate: int) -> None:
    """Write ``samples`` ((S,) or (S, channels); int16, or float in [-1, 1]) as a 16-bit PCM WAV file."""
    soundfile.write(os.fspath(path), samples, sample_rate, subtype="PCM_16", format="WAV")
