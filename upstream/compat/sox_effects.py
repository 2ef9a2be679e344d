"""Shim: a torch/soundfile ``torchaudio.sox_effects`` with the SoX effects s3prl's downstreams use."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ._patch import set_attr, set_module, stand_in_module
from .load import soundfile_load


def _seconds_to_samples(value: str, rate: int) -> int:
    """SoX time spec: seconds (``1.5``), samples (``800s``) or ``[[hh:]mm:]ss``."""
    value = str(value)
    if value.endswith("s") and value[:-1].isdigit():
        return int(value[:-1])
    secs = 0.0
    for part in value.split(":"):
        secs = secs * 60 + float(part)
    return int(round(secs * rate))


def apply_effects_tensor(
    tensor: torch.Tensor, sample_rate: int, effects: Sequence[Sequence[str]], channels_first: bool = True
) -> Tuple[torch.Tensor, int]:
    """The SoX effects s3prl uses, in torch. Returns ((channels, frames) float32, rate).

    Supported: ``channels N`` (1 = average; N > C repeats), ``rate R``, ``gain dB`` (also
    ``gain -n [dB]``: normalise the peak to dB), ``norm [dB]``, ``pad BEFORE [AFTER]``,
    ``trim START [LENGTH]``, ``reverse``. Anything else raises ``NotImplementedError``.
    """
    import torchaudio

    wav = tensor if channels_first else tensor.t()
    wav = wav.float()
    rate = int(sample_rate)
    for effect in effects:
        name, args = effect[0], list(effect[1:])
        if name == "channels":
            n = int(args[0])
            if n == 1:
                wav = wav.mean(dim=0, keepdim=True)
            elif n != wav.shape[0]:
                wav = wav.mean(dim=0, keepdim=True).expand(n, -1).clone()
        elif name == "rate":
            new = int(float(args[0].rstrip("k")) * (1000 if args[0].endswith("k") else 1))
            if new != rate:
                wav = torchaudio.functional.resample(wav, rate, new)
                rate = new
        elif name in ("gain", "norm"):
            if name == "norm" or (args and args[0] == "-n"):
                rest = args[1:] if name == "gain" else args
                level = float(rest[0]) if rest else 0.0
                peak = wav.abs().max()
                if peak > 0:
                    wav = wav * (10 ** (level / 20) / peak)
            else:
                wav = wav * 10 ** (float(args[0]) / 20)
        elif name == "pad":
            before = _seconds_to_samples(args[0], rate) if args else 0
            after = _seconds_to_samples(args[1], rate) if len(args) > 1 else 0
            wav = torch.nn.functional.pad(wav, (before, after))
        elif name == "trim":
            start = _seconds_to_samples(args[0], rate)
            end = start + _seconds_to_samples(args[1], rate) if len(args) > 1 else wav.shape[1]
            wav = wav[:, start:end]
        elif name == "reverse":
            wav = wav.flip(1)
        else:
            raise NotImplementedError(
                f"sox effect {name!r} is not implemented by upstream.compat's torchaudio.sox_effects "
                "stand-in (supported: channels, rate, gain, norm, pad, trim, reverse)"
            )
    if not channels_first:
        wav = wav.t()
    return wav.contiguous(), rate


def apply_effects_file(
    path, effects: Sequence[Sequence[str]], normalize: bool = True, channels_first: bool = True,
    format: Optional[str] = None,
) -> Tuple[torch.Tensor, int]:
    """Load ``path`` with :func:`soundfile_load`, then :func:`apply_effects_tensor`."""
    wav, rate = soundfile_load(path, normalize=True, channels_first=True)
    return apply_effects_tensor(wav, rate, effects, channels_first=channels_first)


def shim_sox_effects() -> bool:
    """Provide ``torchaudio.sox_effects`` (``apply_effects_tensor``, ``apply_effects_file``).

    Prevents ``ModuleNotFoundError: No module named 'torchaudio.sox_effects'`` raised by
    ``from torchaudio.sox_effects import apply_effects_file`` in
    ``s3prl/downstream/speech_commands/dataset.py`` (SUPERB KS), whose loader applies
    ``[["channels", "1"], ["rate", "16000"], ["gain", "-3.0"]]``.
    """
    import torchaudio

    try:
        import torchaudio.sox_effects

        return False
    except ImportError:
        pass
    mod = stand_in_module("torchaudio.sox_effects",
                           "torch/soundfile stand-in for the removed torchaudio.sox_effects (see upstream.compat).")
    mod.apply_effects_tensor = apply_effects_tensor
    mod.apply_effects_file = apply_effects_file
    mod.effect_names = lambda: ["channels", "rate", "gain", "norm", "pad", "trim", "reverse"]
    set_module("torchaudio.sox_effects", mod)
    set_attr(torchaudio, "sox_effects", mod)
    return True
