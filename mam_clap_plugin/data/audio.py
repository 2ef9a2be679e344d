"""Audio loading and log-mel filterbank features (AudioMAE recipe).

Pipeline used for training, evaluation and normalisation statistics:

    load_audio(path, max_frames)            -> (S,) float32 mono waveform at 16 kHz
    wav_to_fbank(wav, target_length)        -> (target_length, 128) log-mel, zero-padded/cropped
    normalize_fbank(fbank, mean, std)       -> (fbank - mean) / (2 * std)

The fbank has one definition, :func:`batch_fbank`: Kaldi's ``fbank`` as AudioMAE calls
``torchaudio.compliance.kaldi.fbank`` (tested against it), computed for a padded batch of
clips of different lengths on any device, with the mel matrix and window built once per
device. ``wav_to_fbank`` is its one-clip form (the data loader's workers);
``task.fbank_on_device=true`` runs it on whole batches in the training step instead.
Resampling kernels are built once per rate pair and device (:func:`resampler`); with
``task.fbank_on_device`` the workers only read and downmix (:func:`load_native_audio`) and
:func:`batch_resample` resamples the batch on the device.

``write_wav(path, samples, rate)`` writes 16-bit PCM WAV files (generated data sets, benchmarks).

Frames are 25 ms windows every 10 ms (Kaldi ``snip_edges`` framing), so ``n`` frames need
``(n - 1) * 10 + 25`` ms of audio.
"""
from __future__ import annotations

import functools
import math
import os

import soundfile
import torch
import torchaudio

from ..modules.precision import ieee_fp32

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
FRAME_SHIFT_MS = 10
WINDOW_MS = 25
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_MS // 1000  # 400
SHIFT_SAMPLES = SAMPLE_RATE * FRAME_SHIFT_MS // 1000  # 160
FFT_SIZE = 512  # the window rounded up to a power of two (Kaldi's round_to_power_of_two)
PREEMPHASIS = 0.97  # Kaldi's default preemphasis_coefficient
LOW_HZ = 20.0  # Kaldi's default low_freq; high_freq = Nyquist

#: The Kaldi fbank that :func:`batch_fbank` computes, as the keyword arguments of
#: ``torchaudio.compliance.kaldi.fbank`` (its reference in the tests; recorded in encoder
#: exports as the front end the encoder expects).
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


class AudioNotFoundError(AudioError):
    """The audio file does not exist (the dataset then checks the manifest's root)."""


def _fail(path: str, where: str | None, problem: str, kind: type = AudioError) -> AudioError:
    """Build an AudioError (or ``kind``) whose message starts with ``where`` (if given) and the path."""
    prefix = f"{where}: " if where else ""
    return kind(f"{prefix}{path}: {problem}")


#: How far a file may fall short of its manifest's sample count before it counts as truncated:
#: 1% of the count or 0.1 s at the file's rate, whichever is more (decoders of compressed formats
#: may disagree by a frame or so with the count a manifest tool wrote).
SHORTFALL_FRACTION = 0.01
SHORTFALL_SECONDS = 0.1


def _check_length(path: str, where: str | None, expected: int, available: int, rate: int) -> None:
    """AudioError if ``available`` samples fall short of the manifest's ``expected`` beyond the tolerance."""
    allowed = max(expected * SHORTFALL_FRACTION, rate * SHORTFALL_SECONDS)
    if expected > 0 and expected - available > allowed:
        raise _fail(path, where, f"truncated audio: {available} samples, but the manifest says {expected} "
                                 f"({expected - available} missing)")


def _read(path: str, max_ms: int | None, where: str | None,
          expected: int | None = None) -> tuple[torch.Tensor, int]:
    """Read the file (or its first ``max_ms`` milliseconds); returns ((S, C) float32, rate).

    With ``expected`` (the manifest's sample count at the file's rate), a file shorter than
    that beyond the tolerance (:data:`SHORTFALL_FRACTION`, :data:`SHORTFALL_SECONDS`) raises
    AudioError: its frame count says so, or fewer samples decode than the read asked for.
    """
    if not os.path.isfile(path):
        raise _fail(path, where, "audio file not found", AudioNotFoundError)
    try:
        with soundfile.SoundFile(path) as sound:
            rate = sound.samplerate
            num = -1 if max_ms is None else -(-max_ms * rate // 1000)
            if expected is not None:
                _check_length(path, where, expected, sound.frames, rate)
            data = sound.read(frames=num, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as err:
        raise _fail(path, where, f"cannot read audio ({err})") from err
    if expected is not None:
        wanted = expected if num < 0 else min(num, expected)
        _check_length(path, where, wanted, data.shape[0], rate)
    return torch.from_numpy(data), rate


def _load_mono(path: str, max_ms: int | None, where: str | None,
               expected: int | None = None) -> tuple[torch.Tensor, int]:
    """Mono float32 waveform at the file's own rate, checked; returns ((S,), rate)."""
    data, rate = _read(path, max_ms, where, expected)
    if data.shape[0] == 0:
        raise _fail(path, where, "audio is empty (0 samples)")
    wav = data[:, 0]
    for channel in range(1, data.shape[1]):  # the channel mean, ~10x faster than mean(dim=1) over 2 columns
        wav = wav + data[:, channel]
    wav = wav / data.shape[1] if data.shape[1] > 1 else wav.contiguous()
    if not torch.isfinite(wav).all():
        raise _fail(path, where, "audio contains NaN or Inf samples")
    return wav, rate


@functools.lru_cache(maxsize=32)
def resampler(rate: int, target_rate: int, device: torch.device | None = None) -> torchaudio.transforms.Resample:
    """torchaudio's resampler from ``rate`` to ``target_rate``, its kernel built once per rate
    pair and device (and per process: each data loader worker keeps its own). The kernel is
    computed in float32, as ``torchaudio.functional.resample`` does for float32 audio: the same samples."""
    module = torchaudio.transforms.Resample(rate, target_rate, dtype=torch.float32)
    return module if device is None else module.to(device)


def resampled_length(num_samples, rate: int, target_rate: int):
    """Samples that torchaudio's resampler returns for ``num_samples`` at ``rate``:
    ``ceil(num_samples * target_rate / rate)`` (an int, or an int64 tensor of any shape)."""
    gcd = math.gcd(int(rate), int(target_rate))
    return -(-num_samples * (target_rate // gcd) // (rate // gcd))


def _resample(wav: torch.Tensor, rate: int, target_rate: int) -> torch.Tensor:
    if rate != target_rate:
        wav = resampler(rate, target_rate)(wav)
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


def load_audio(path: str, max_frames: int | None = None, where: str | None = None,
               expected_samples: int | None = None) -> torch.Tensor:
    """Load a mono 16 kHz float32 waveform of shape (S,).

    Args:
        path: audio file readable by soundfile; channels are averaged, other sample rates
            are resampled with ``torchaudio.functional.resample``.
        max_frames: if given, read only the start of the file: the samples needed for this
            many fbank frames at the file's native rate (see ``frames_to_samples``).  Up to
            float rounding this does not change those frames: Kaldi fbank removes each
            frame's DC offset, so the waveform mean that ``wav_to_fbank`` subtracts cancels.
        where: location to prepend to error messages, e.g. ``"/data/train.tsv:12"``.
        expected_samples: the manifest's sample count (at the file's rate): a file that falls
            short of it beyond a small tolerance is truncated (AudioError).

    Raises:
        AudioError: missing, unreadable, empty, truncated, or non-finite audio.
    """
    wav, rate = _load_mono(path, None if max_frames is None else _frames_ms(max_frames), where, expected_samples)
    return _resample(wav, rate, SAMPLE_RATE)


def load_teacher_audio(path: str, sample_rate: int, num_samples: int, where: str | None = None,
                       expected_samples: int | None = None) -> torch.Tensor:
    """A teacher's input: the first ``num_samples`` samples at ``sample_rate``, (num_samples,)
    float32, zero-padded at the end like the student's fbank. Raises AudioError (see :func:`load_audio`)."""
    max_ms = -(-num_samples * 1000 // sample_rate)
    wav, rate = _load_mono(path, max_ms, where, expected_samples)
    return fit_length(_resample(wav, rate, sample_rate), num_samples)


def load_entry_teacher_audio(manifest, index: int, sample_rate: int, num_samples: int) -> torch.Tensor:
    """A teacher's input for manifest entry ``index`` (:func:`load_teacher_audio`), errors naming its
    manifest line, and a file shorter than the manifest's sample count refused as truncated. What
    target extraction, zero-shot scoring (:class:`TeacherInputs`) and the caption teacher's training
    (:class:`~.caption_dataset.CaptionDataset`) read. Raises AudioError."""
    return load_teacher_audio(manifest.full_path(index), sample_rate, num_samples, where=manifest.where(index),
                              expected_samples=int(manifest.sizes[index]))


class TeacherInputs(torch.utils.data.Dataset):
    """A teacher's inputs for manifest entries: item ``i`` is ``(index, waveform or None, error or
    None)`` for entry ``indices[i]`` (:func:`load_entry_teacher_audio`). An unreadable file comes back as
    its error message, so a DataLoader's main process reports it without a worker traceback; batch
    with ``collate_fn=list``. Used by target extraction and zero-shot scoring."""

    def __init__(self, manifest, indices, sample_rate: int, num_samples: int):
        self.manifest, self.indices = manifest, indices
        self.sample_rate, self.num_samples = sample_rate, num_samples

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        index = int(self.indices[i])
        try:
            wav = load_entry_teacher_audio(self.manifest, index, self.sample_rate, self.num_samples)
        except AudioError as err:
            return index, None, str(err)
        return index, wav, None


def _read_ms(max_frames: int, teacher_input: tuple[int, int] | None) -> int:
    """Milliseconds to read for ``max_frames`` student frames and a teacher's (rate, num_samples)."""
    if teacher_input is None:
        return _frames_ms(max_frames)
    sample_rate, num_samples = teacher_input
    return max(_frames_ms(max_frames), -(-num_samples * 1000 // sample_rate))


def load_student_and_teacher_audio(path: str, max_frames: int, sample_rate: int, num_samples: int,
                                   where: str | None = None,
                                   expected_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One read of the file for both inputs: ``load_audio(path, max_frames)`` and
    ``load_teacher_audio(path, sample_rate, num_samples)``."""
    wav, rate = load_native_audio(path, max_frames, (sample_rate, num_samples), where, expected_samples)
    student = _resample(wav[: frames_to_samples(max_frames, rate)], rate, SAMPLE_RATE)
    return student, fit_length(_resample(wav, rate, sample_rate), num_samples)


def load_native_audio(path: str, max_frames: int, teacher_input: tuple[int, int] | None = None,
                      where: str | None = None, expected_samples: int | None = None) -> tuple[torch.Tensor, int]:
    """The start of a file at its own rate, mono and checked: as far as ``max_frames`` student
    frames (and an online teacher's ``(sample_rate, num_samples)``) need. Returns ((S,) float32,
    rate). The workers' part of ``task.fbank_on_device``: :func:`batch_resample` then resamples
    on the device, to the same samples as :func:`load_student_and_teacher_audio` / :func:`load_audio`.
    Raises AudioError (see :func:`load_audio`)."""
    return _load_mono(path, _read_ms(max_frames, teacher_input), where, expected_samples)


def batch_resample(wavs: torch.Tensor, lengths: torch.Tensor, rates, target_rate: int,
                   width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a zero-padded batch of clips at their own rates, on the batch's device.

    Each row becomes what torchaudio's resampler gives for that clip alone (its first
    ``lengths[i]`` samples; up to float rounding), zero-padded. One resampling per distinct rate,
    its kernel cached per device (:func:`resampler`); rows already at ``target_rate`` are copied.

    Args:
        wavs: (B, S) float32 waveforms; samples past ``lengths`` are ignored.
        lengths: (B,) int64 samples of each clip to resample, on the batch's device.
        rates: B ints, each clip's sample rate (host-side, so that grouping needs no sync).
        target_rate: the output rate.
        width: output samples (crop or zero-pad); None = the longest clip's resampled length bound.

    Returns:
        ((B, width) float32 waveforms, (B,) int64 resampled lengths, capped at ``width``).
    """
    batch, samples = wavs.shape
    rates = [int(r) for r in rates]
    if len(rates) != batch:
        raise ValueError(f"batch_resample: {len(rates)} sample rates for a batch of {batch} clips")
    groups: dict[int, list[int]] = {}
    for row, rate in enumerate(rates):
        groups.setdefault(rate, []).append(row)
    if width is None:
        width = max(resampled_length(samples, rate, target_rate) for rate in groups)
    position = torch.arange(samples, device=wavs.device)
    wavs = wavs.float() * (position[None, :] < lengths[:, None])  # zeros past each clip, as torchaudio pads
    out = wavs.new_zeros(batch, width)
    out_lengths = torch.empty_like(lengths)
    with ieee_fp32(wavs.device):  # no TF32 for the resampler's convolution on GPUs
        for rate, rows in groups.items():
            index = slice(None) if len(rows) == batch else torch.tensor(rows, device=wavs.device)
            part = wavs[index]
            if rate != target_rate:
                part = resampler(rate, target_rate, wavs.device)(part)
            part = part[:, :width]
            out[index, : part.shape[1]] = part
            out_lengths[index] = resampled_length(lengths[index], rate, target_rate)
    out_lengths = out_lengths.clamp(max=width)
    return out * (torch.arange(width, device=wavs.device)[None, :] < out_lengths[:, None]), out_lengths


@functools.lru_cache(maxsize=8)
def _fbank_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hanning window (400,), mel matrix (257, 128)) on ``device``: Kaldi's HTK-mel
    triangles from torchaudio, with its zero column for the Nyquist bin."""
    mel, _ = torchaudio.compliance.kaldi.get_mel_banks(
        NUM_MEL_BINS, FFT_SIZE, float(SAMPLE_RATE), LOW_HZ, 0.0, 100.0, -500.0, 1.0)
    mel = torch.nn.functional.pad(mel, (0, 1)).t().contiguous().to(device)
    window = torch.hann_window(WINDOW_SAMPLES, periodic=False, dtype=torch.float32).to(device)
    return window, mel


def num_fbank_frames(num_samples):
    """Frames of a 16 kHz clip of ``num_samples`` samples (Kaldi ``snip_edges``; a clip shorter
    than one window still gives one frame): an int, or an int64 tensor of any shape (same shape out)."""
    if torch.is_tensor(num_samples):
        return 1 + (num_samples - WINDOW_SAMPLES).clamp(min=0) // SHIFT_SAMPLES
    return 1 + max(0, num_samples - WINDOW_SAMPLES) // SHIFT_SAMPLES


def batch_fbank(wavs: torch.Tensor, lengths: torch.Tensor | None = None, target_length: int = 1024) -> torch.Tensor:
    """AudioMAE log-mel fbank of a batch of 16 kHz clips, on the batch's device.

    Per clip, exactly ``torchaudio.compliance.kaldi.fbank(wav - wav.mean(), htk_compat=True,
    use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)``
    (up to float rounding): 25 ms frames every 10 ms, each with its DC offset removed,
    pre-emphasis 0.97, a Hanning window, a 512-point power spectrum, 128 HTK-mel bins from
    20 Hz to 8 kHz, ``log(max(energy, eps))``; then zero frames up to ``target_length`` or a crop.

    Args:
        wavs: (B, S) float waveforms, zero-padded at the end; a clip shorter than one window
            (400 samples) is zero-padded (after mean removal) so that one frame exists.
        lengths: (B,) int64 real samples of each clip; None = all S.
        target_length: output frames.

    Returns:
        (B, target_length, 128) float32 unnormalised log-mel fbanks.
    """
    if wavs.dim() != 2:
        raise ValueError(f"batch_fbank expects a (B, S) batch of waveforms, got shape {tuple(wavs.shape)}")
    if target_length < 1:
        raise ValueError(f"target_length must be >= 1, got {target_length}")
    batch, width = wavs.shape
    wavs = wavs.float()
    if lengths is None:
        lengths = torch.full((batch,), width, dtype=torch.long, device=wavs.device)
    real = torch.arange(width, device=wavs.device)[None, :] < lengths[:, None]
    # the mean in float64: the same value however the clip is batched (a float32 sum's rounding
    # depends on the batch's shape and threads, and moves the near-silent mel bins)
    mean = (wavs.double() * real).sum(dim=1, keepdim=True) / lengths.clamp(min=1)[:, None]
    wavs = (wavs - mean.float()) * real  # the padding stays zero after mean removal
    if width < WINDOW_SAMPLES:
        wavs = torch.nn.functional.pad(wavs, (0, WINDOW_SAMPLES - width))
    frames = min(target_length, num_fbank_frames(wavs.shape[1]))  # from the shape, on the host: no sync
    window, mel = _fbank_constants(wavs.device)
    x = wavs.unfold(1, WINDOW_SAMPLES, SHIFT_SAMPLES)[:, :frames]  # (B, frames, 400)
    x = x - x.mean(dim=-1, keepdim=True)
    x = x - PREEMPHASIS * torch.cat([x[..., :1], x[..., :-1]], dim=-1)
    power = torch.fft.rfft(x * window, n=FFT_SIZE).abs().pow(2.0)  # (B, frames, 257)
    with ieee_fp32(wavs.device):  # no TF32 for the mel projection on GPUs
        fbank = torch.matmul(power, mel).clamp(min=torch.finfo(torch.float32).eps).log()
    valid = torch.arange(frames, device=wavs.device)[None, :] < num_fbank_frames(lengths)[:, None]
    fbank = fbank * valid[..., None]
    if frames < target_length:
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, target_length - frames))
    return fbank


def wav_to_fbank(wav: torch.Tensor, target_length: int = 1024) -> torch.Tensor:
    """AudioMAE log-mel fbank of one 16 kHz waveform: :func:`batch_fbank` of a batch of one.

    Args:
        wav: (S,) float waveform at 16 kHz.
        target_length: number of output frames; zero-pad at the end or crop.

    Returns:
        (target_length, 128) float32 unnormalised log-mel fbank.
    """
    if wav.dim() != 1:
        raise ValueError(f"wav_to_fbank expects a 1-D waveform (S,), got shape {tuple(wav.shape)}")
    return batch_fbank(wav[None], None, target_length)[0]


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
