"""Checkpoint loading on torch >= 2.6: weights-only by default, refused clearly otherwise."""
import argparse

import pytest
import torch

from mam_clap_plugin.checkpoint import CheckpointError, load_checkpoint, load_encoder, model_config
from mam_clap_plugin.modules.encoder import AudioEncoder

MODEL_CFG = {"_name": "supmam_clap", "encoder_embed_dim": 32, "encoder_layers": 2, "encoder_attention_heads": 4,
             "mlp_ratio": 4.0, "max_frames": 256}


def fairseq_layout(encoder: AudioEncoder, **extra):
    """What fairseq's trainer saves: cfg as a plain dict, the model's full state dict."""
    model = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    model["decoder.embed.weight"] = torch.zeros(4, 32)  # pretraining-only keys are ignored
    return {"args": None, "cfg": {"model": dict(MODEL_CFG), "task": {"_name": "mam_clap_pretraining"}},
            "model": model, **extra}


def test_weights_only_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = AudioEncoder.from_model_config(MODEL_CFG).eval()
    path = tmp_path / "checkpoint_last.pt"
    torch.save(fairseq_layout(encoder), path)
    loaded = load_encoder(str(path))
    x = torch.randn(2, 1, 64, 128)
    assert torch.equal(loaded.extract_features(x)["x"], encoder.extract_features(x)["x"])
    assert not loaded.training


def test_untrusted_objects_are_refused_unless_trusted(tmp_path):
    encoder = AudioEncoder.from_model_config(MODEL_CFG)
    path = tmp_path / "old_fairseq.pt"
    torch.save(fairseq_layout(encoder, args=argparse.Namespace(arch="x")), path)
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_checkpoint(str(path))
    assert isinstance(load_checkpoint(str(path), trusted=True)["args"], argparse.Namespace)


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    other = {"cfg": {"model": {"_name": "wav2vec2"}}, "model": {}}
    with pytest.raises(CheckpointError, match="wav2vec2"):
        model_config(other, "w2v.pt")
    encoder = AudioEncoder.from_model_config(MODEL_CFG)
    state = fairseq_layout(encoder)
    state["cfg"]["model"]["encoder_layers"] = 3  # config and weights disagree
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_encoder(str(tmp_path / "mismatch.pt"))
