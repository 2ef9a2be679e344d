"""The HEAR 2021 API (Holistic Evaluation of Audio Representations) for this project's encoder.

    model = load_model("encoder.safetensors")        # any file or folder load_encoder reads
    scene = get_scene_embeddings(audio, model)       # (n_sounds, model.scene_embedding_size)
    emb, ts = get_timestamp_embeddings(audio, model) # (n_sounds, n_timestamps, model.timestamp_embedding_size),
                                                     # (n_sounds, n_timestamps) in milliseconds

``audio`` is a float32 tensor (n_sounds, n_samples) in [-1, 1] at 16 kHz, of any length, on the
model's device (the HEAR evaluation kit puts the model there with ``model.to(device)``).
Nothing here imports fairseq or s3prl (nor huggingface_hub).

How sounds become embeddings: the code of ``examples/extract_features.py`` and the s3prl
upstream (:mod:`mam_clap_plugin.features`), nothing re-implemented.

1. Each sound of S samples gets ``T = len(range(0, S, 2560))`` time steps of 160 ms (one
   16-frame time patch each); its fbank is computed from its own samples and zero-padded to
   16 T frames, so a 0.1 s sound is one patch (as pretraining pads short clips).
2. The fbank is encoded by windows of the encoder's ``max_frames`` (1024 frames = 10.24 s),
   the last window keeping its own length; the windows' token grids (T, 8, D) are
   concatenated along time.
3. **Scene embedding** = ``examples/extract_features.py --level clip``: the grid's mean over
   time and frequency (``pool_outputs(..., "clip", layer)``, the same function), (D,).
4. **Timestamp embeddings** = ``--level frame`` (mean over the 8 frequency patches of each step;
   ``freq_pool="concat"``: ``--level patch`` flattened, 8 D), one every 160 ms. Step ``i`` was
   computed from samples ``[2560 i, 2560 i + 2800)`` (16 Kaldi frames of 400 samples, hop 160),
   so its timestamp is their centre, ``160 i + 87.5`` ms. A step whose centre lies past the end
   of the sound (it describes mostly padding) gets no timestamp, except that every sound has at
   least one: ``n_timestamps = max(1, (S - 1400) // 2560 + 1)``, the same for the whole batch.

Layer and pooling (keyword arguments of :func:`load_model`, e.g. the kit's ``--model-options``):

* ``layer="final"`` (default): the encoder's output after its final LayerNorm. It is what
  pretraining trains: the CLAP-target regression head and the supervised classification head
  read it, so it carries the teacher's semantics; it is also the default of
  ``extract_features.py`` and the s3prl upstream's ``last_hidden_state``, so HEAR numbers describe
  the same features users extract. ``layer=N`` takes hidden state N (0 = patch embedding,
  N = block N); ``layer="all"`` concatenates the depth + 1 hidden states (L D wide; the
  weighted-sum-free way to let the kit's probe see every layer).
* ``freq_pool="mean"`` (default) for timestamps: D wide, as the upstream's default; ``"concat"``
  keeps the 8 frequency bands (8 D wide). The scene embedding is always the mean over time and
  frequency.
* ``window_frames`` (default ``max_frames``) and ``max_windows_per_batch`` (memory cap): as in
  ``extract_features.py``; ``trusted=True`` loads a torch file with ``weights_only=False``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint import load_encoder_with_stats
from .data.audio import SAMPLE_RATE, SHIFT_SAMPLES, WINDOW_SAMPLES
from .features import (
    DOWNSAMPLE_RATE,
    check_freq_pool,
    check_window,
    clip_fbank,
    encode_windows,
    parse_layer,
    pool_outputs,
)
from .modules.encoder import PATCH_SIZE

#: Samples from the start of a time step to the centre of what it was computed from:
#: 16 frames of 400 samples with a hop of 160 span 15 * 160 + 400 = 2800 samples.
CENTRE_SAMPLES = ((PATCH_SIZE - 1) * SHIFT_SAMPLES + WINDOW_SAMPLES) // 2  # 1400


class HearModel(nn.Module):
    """The encoder with what the HEAR API needs: ``sample_rate``, ``scene_embedding_size``,
    ``timestamp_embedding_size``, the fbank normalisation and the chosen layer and pooling.
    Built by :func:`load_model`; ``.to(device)`` moves the encoder."""

    def __init__(self, encoder: nn.Module, norm_mean: float, norm_std: float, layer="final", freq_pool: str = "mean",
                 window_frames: Optional[int] = None, max_windows_per_batch: Optional[int] = None):
        super().__init__()
        check_freq_pool(freq_pool)
        self.encoder = encoder.eval()
        self.norm_mean, self.norm_std = float(norm_mean), float(norm_std)
        self.layer = parse_layer(layer, len(encoder.blocks))
        self.freq_pool = freq_pool
        self.window_frames = check_window(encoder, window_frames)
        self.max_windows_per_batch = int(max_windows_per_batch) if max_windows_per_batch else None
        layers = len(encoder.blocks) + 1 if self.layer == "all" else 1
        self.sample_rate = SAMPLE_RATE
        self.scene_embedding_size = int(layers * encoder.embed_dim)
        self.timestamp_embedding_size = int(layers * encoder.embed_dim * (encoder.grid_freq if freq_pool == "concat"
                                                                          else 1))
        self.eval()

    def encode(self, audio: torch.Tensor) -> List[List[torch.Tensor]]:
        """(n_sounds, n_samples) -> per sound the depth + 2 token grids (T, F, D) of
        :func:`mam_clap_plugin.features.encode_windows`."""
        if not torch.is_tensor(audio) or audio.dim() != 2:
            shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
            raise ValueError(f"audio must be a tensor (n_sounds, n_samples), got {shape}")
        if audio.shape[0] == 0 or audio.shape[1] == 0:
            raise ValueError(f"audio of shape {tuple(audio.shape)}: no sounds or no samples")
        audio = audio.to(device=self.encoder.cls_token.device, dtype=torch.float32)
        fbanks = [clip_fbank(wav, self.norm_mean, self.norm_std) for wav in audio]
        return encode_windows(self.encoder, fbanks, self.window_frames, self.max_windows_per_batch)

    def scene(self, outputs: List[torch.Tensor]) -> torch.Tensor:
        """One sound's scene embedding (scene_embedding_size,): the clip-level feature."""
        return pool_outputs(outputs, "clip", self.layer).reshape(-1)

    def frames(self, outputs: List[torch.Tensor]) -> torch.Tensor:
        """One sound's embedding per time step (T, timestamp_embedding_size)."""
        x = pool_outputs(outputs, "frame" if self.freq_pool == "mean" else "patch", self.layer)
        if self.layer == "all":  # (L, T, ...) -> (T, L, ...)
            x = x.movedim(0, 1)
        return x.reshape(x.shape[0], -1)


def num_timestamps(num_samples: int) -> int:
    """Time steps whose centre (``2560 i + 1400`` samples) lies within a sound of ``num_samples``
    samples, at least one."""
    return max(1, (num_samples - CENTRE_SAMPLES) // DOWNSAMPLE_RATE + 1)


def timestamps_ms(num_samples: int, device=None) -> torch.Tensor:
    """(num_timestamps(num_samples),) float32 centres in milliseconds: ``160 i + 87.5``."""
    steps = torch.arange(num_timestamps(num_samples), device=device, dtype=torch.float64)
    return ((steps * DOWNSAMPLE_RATE + CENTRE_SAMPLES) * 1000.0 / SAMPLE_RATE).float()


def load_model(model_file_path: str = "", *, layer="final", freq_pool: str = "mean",
               window_frames: Optional[int] = None, max_windows_per_batch: Optional[int] = None,
               trusted: bool = False) -> HearModel:
    """The encoder of ``model_file_path`` as a HEAR model (eval mode, on the CPU).

    Args:
        model_file_path: anything ``mam_clap_plugin.load_encoder`` reads: an encoder export
            (``.safetensors`` or ``.pt``), a Hugging Face folder (``export_encoder.py --hub``),
            a converted AudioMAE file, a pretraining or fine-tuning checkpoint. Required: this
            module ships no weights.
        layer: ``"final"`` (default), a hidden state ``0..depth`` (int or text) or ``"all"``.
        freq_pool: timestamp embeddings' frequency pooling, ``"mean"`` (default) or ``"concat"``.
        window_frames, max_windows_per_batch: encoder windows (see the module docstring).
        trusted: load a torch file with ``weights_only=False`` (trusted files only).
    """
    if not model_file_path:
        raise ValueError("mam_clap_plugin.hear.load_model needs model_file_path: this module ships no weights. "
                         "Pass an encoder export, a Hugging Face folder or a checkpoint (the HEAR kit: "
                         "python3 -m heareval.embeddings.runner mam_clap_plugin.hear --model PATH)")
    bundle = load_encoder_with_stats(str(model_file_path), trusted=trusted)
    return HearModel(bundle.encoder, bundle.norm_mean, bundle.norm_std, layer, freq_pool, window_frames,
                     max_windows_per_batch)


@torch.no_grad()
def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """(n_sounds, n_samples) float32 audio at 16 kHz -> (n_sounds, model.scene_embedding_size)
    float32 on the model's device."""
    return torch.stack([model.scene(outputs) for outputs in model.encode(audio)])


@torch.no_grad()
def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> Tuple[torch.Tensor, torch.Tensor]:
    """(n_sounds, n_samples) float32 audio at 16 kHz -> (embeddings (n_sounds, n_timestamps,
    model.timestamp_embedding_size) float32, timestamps (n_sounds, n_timestamps) float32 in
    milliseconds, the centres of the 160 ms steps, the same for every sound), on the model's device."""
    per_sound = model.encode(audio)
    n = num_timestamps(audio.shape[1])
    embeddings = torch.stack([model.frames(outputs)[:n] for outputs in per_sound])
    timestamps = timestamps_ms(audio.shape[1], embeddings.device).expand(embeddings.shape[0], -1).contiguous()
    return embeddings, timestamps
