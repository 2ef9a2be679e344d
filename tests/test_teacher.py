"""ClapTeacher: checkpoint layouts, strict loading, map shapes, front-end maths, frozen behaviour.

Small random teachers (embed 16) in the real LAION / MS-CLAP key layouts; one test builds the
real HTSAT-tiny shapes. Numerical parity with the reference code is in test_teacher_parity.py.
"""
import argparse
import hashlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mam_clap_fixtures.clap import dft_weights, save_random_clap_checkpoint
from mam_clap_plugin.files import file_sha256
from mam_clap_plugin.teacher import ClapCheckpointError, ClapTeacher, load_clap_teacher
from mam_clap_plugin.teacher.clap import AudioBranch, _infer_architecture, hz_to_mel, mel_filterbank, mel_to_hz

from .references import slaney_hz_to_mel, slaney_mel_filterbank, slaney_mel_to_hz

# Shifted blocks in stages 0 and 2; widths 16, 32, 64, 128.
SMALL = dict(embed_dim=16, depths=[2, 1, 2, 1], num_heads=[1, 2, 2, 4])


@pytest.fixture(scope="module")
def laion_path(tmp_path_factory):
    return save_random_clap_checkpoint(str(tmp_path_factory.mktemp("clap") / "laion.pt"), "laion", seed=0, **SMALL)


@pytest.fixture(scope="module")
def msclap_path(tmp_path_factory):
    return save_random_clap_checkpoint(str(tmp_path_factory.mktemp("clap") / "msclap.pt"), "msclap", seed=1, **SMALL)


def _wav(teacher: ClapTeacher, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(batch, teacher.num_samples, generator=torch.Generator().manual_seed(seed))


def _rewrite(src: str, dst: str, edit) -> str:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


# ----------------------------------------------------------------------------- layouts and shapes


def test_laion_layout_maps(laion_path):
    final = load_clap_teacher(laion_path)
    assert (final.layout, final.layer, final.projection) == ("laion", "final", False)
    assert final.name == "laion-clap-htsat-e16-d2121-h1.2.2.4"
    assert (final.sample_rate, final.seconds, final.num_samples) == (48000, 10.0, 480000)
    assert (final.fmin, final.fmax, final.mel_bins) == (50.0, 14000.0, 64)
    assert final.grid == (2, 32) and final.dim == 128
    wav = _wav(final)
    out = final(wav)
    assert out.shape == (2, 2, 32, 128) and out.dtype == torch.float32 and torch.isfinite(out).all()

    proj = load_clap_teacher(laion_path, "final", projection=True)
    assert proj.grid == (2, 32) and proj.dim == 512
    # audio_projection = Linear -> ReLU -> Linear, applied per token.
    sd = torch.load(laion_path, weights_only=True)["state_dict"]
    p = "module.audio_projection."
    hidden = F.relu(F.linear(out, sd[p + "0.weight"], sd[p + "0.bias"]))
    expected = F.linear(hidden, sd[p + "2.weight"], sd[p + "2.bias"])
    torch.testing.assert_close(proj(wav), expected, atol=1e-5, rtol=1e-5)

    stage3 = load_clap_teacher(laion_path, "stage3")
    assert stage3.grid == (4, 64) and stage3.dim == 64
    assert len(stage3.branch.layers) == 3 and stage3.branch.layers[2].downsample is None
    assert stage3.branch.norm is None  # only the layers it needs
    # The stage-3 map is the full teacher's stage-3 block output, before PatchMerging, regrouped.
    seen = {}
    final.branch.layers[2].downsample.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    final(wav)
    x = seen["x"].view(2, 4, 4, 16, 64)  # (B, chunk, freq cell, column, C): rows = chunk * 4 + cell
    torch.testing.assert_close(stage3(wav), x.transpose(1, 2).reshape(2, 4, 64, 64), atol=0, rtol=0)


def test_msclap_layout_maps(msclap_path):
    final = load_clap_teacher(msclap_path)
    assert (final.layout, final.name) == ("msclap", "ms-clap-2023-htsat-e16-d2121-h1.2.2.4")
    assert (final.sample_rate, final.seconds, final.num_samples) == (44100, 7.0, 308700)
    assert final.fmin == pytest.approx(50 * 44100 / 32000) and final.fmax == pytest.approx(14000 * 44100 / 32000)
    wav = _wav(final, 1)
    out = final(wav)
    assert out.shape == (1, 2, 32, 128)
    assert load_clap_teacher(msclap_path, "stage3")(wav).shape == (1, 4, 64, 64)

    proj = load_clap_teacher(msclap_path, projection=True)
    assert proj.dim == 1024
    sd = torch.load(msclap_path, weights_only=True)["model"]
    p = "audio_encoder.projection."
    e = F.linear(out, sd[p + "linear1.weight"])
    expected = F.layer_norm(e + F.linear(F.gelu(e), sd[p + "linear2.weight"]), (1024,),
                            sd[p + "layer_norm.weight"], sd[p + "layer_norm.bias"])
    torch.testing.assert_close(proj(wav), expected, atol=1e-5, rtol=1e-5)


def test_checkpoint_key_layout(laion_path, msclap_path):
    laion = torch.load(laion_path, weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in laion)
    for key, shape in [("module.audio_branch.spectrogram_extractor.stft.conv_real.weight", (513, 1, 1024)),
                       ("module.audio_branch.logmel_extractor.melW", (513, 64)),
                       ("module.audio_branch.bn0.running_var", (64,)),
                       ("module.audio_branch.layers.0.blocks.1.attn_mask", (64, 64, 64)),
                       ("module.audio_branch.layers.0.blocks.0.attn.relative_position_bias_table", (225, 1)),
                       ("module.audio_branch.layers.2.downsample.reduction.weight", (128, 256)),
                       ("module.audio_branch.tscam_conv.weight", (527, 128, 2, 3)),
                       ("module.audio_projection.0.weight", (512, 128))]:
        assert tuple(laion[key].shape) == shape, key
    assert any(k.startswith("module.text_branch.") for k in laion) and "module.logit_scale_a" in laion
    ms = torch.load(msclap_path, weights_only=True)["model"]
    assert "audio_encoder.base.htsat.layers.3.blocks.0.attn.qkv.weight" in ms
    assert any(k.startswith("caption_encoder.") for k in ms) and "logit_scale" in ms
    # Real front-end weights: hann-windowed DFT rows and an MS-CLAP filterbank built for 32 kHz.
    real, imag = dft_weights(1024)
    x = torch.randn(4096, dtype=torch.float64)
    frames = x.unfold(0, 1024, 512)  # (7, 1024)
    spec = torch.fft.rfft(frames * torch.hann_window(1024, periodic=True, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(frames @ real.double()[:, 0].T, spec.real, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(frames @ imag.double()[:, 0].T, spec.imag, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(ms["audio_encoder.base.htsat.logmel_extractor.melW"].double().numpy(),
                               slaney_mel_filterbank(32000, 1024, 64, 50, 14000), atol=1e-6, rtol=1e-4)


def test_bare_state_dict_without_module_prefix(laion_path, tmp_path):
    def edit(ckpt):
        sd = ckpt.pop("state_dict")
        ckpt.clear()
        ckpt.update({k[len("module."):]: v for k, v in sd.items()})
    bare = _rewrite(laion_path, str(tmp_path / "bare.pt"), edit)
    wav = _wav(load_clap_teacher(laion_path), 1)
    torch.testing.assert_close(load_clap_teacher(bare)(wav), load_clap_teacher(laion_path)(wav), atol=0, rtol=0)


def test_real_htsat_tiny_shapes(tmp_path):
    path = save_random_clap_checkpoint(str(tmp_path / "tiny.pt"), "laion", "tiny")
    final = load_clap_teacher(path)
    assert final.name == "laion-clap-htsat-tiny" and final.dim == 768 and final.grid == (2, 32)
    assert sum(p.numel() for p in final.parameters()) > 27_000_000  # forward: test_teacher_parity.py
    stage3 = load_clap_teacher(path, "stage3")
    assert stage3.dim == 384 and stage3.grid == (4, 64)
    # Architecture inference for HTSAT-base from shapes alone (meta tensors, nothing allocated).
    with torch.device("meta"):
        base = AudioBranch(128, (2, 2, 12, 2), (4, 8, 16, 32)).state_dict()
    arch = _infer_architecture("base", base)
    assert arch.size == "base" and (arch.window, arch.patch_size, arch.n_fft, arch.mel_bins) == (8, 4, 1024, 64)


# ----------------------------------------------------------------------------- refusals


def test_strict_mismatch_lists_keys(laion_path, tmp_path):
    def edit(ckpt):
        sd = ckpt["state_dict"]
        del sd["module.audio_branch.layers.1.blocks.0.mlp.fc1.bias"]
        sd["module.audio_branch.layers.1.blocks.0.extra.weight"] = torch.zeros(3)
        sd["module.audio_branch.norm.weight"] = torch.ones(7)
    bad = _rewrite(laion_path, str(tmp_path / "bad.pt"), edit)
    with pytest.raises(ClapCheckpointError) as err:
        load_clap_teacher(bad)
    msg = str(err.value)
    assert bad in msg and "layers.1.blocks.0.mlp.fc1.bias" in msg and "layers.1.blocks.0.extra.weight" in msg
    assert "norm.weight (7,) != (128,)" in msg

    def no_projection(ckpt):
        for k in [k for k in ckpt["state_dict"] if "audio_projection" in k]:
            del ckpt["state_dict"][k]
    noproj = _rewrite(laion_path, str(tmp_path / "noproj.pt"), no_projection)
    assert load_clap_teacher(noproj).dim == 128  # the projection is only needed on request
    with pytest.raises(ClapCheckpointError, match="audio_projection"):
        load_clap_teacher(noproj, projection=True)


def test_msclap_stray_audio_key_refused(msclap_path, tmp_path):
    bad = _rewrite(msclap_path, str(tmp_path / "stray.pt"),
                   lambda c: c["model"].__setitem__("audio_encoder.extra.weight", torch.zeros(2)))
    with pytest.raises(ClapCheckpointError, match="audio_encoder.extra.weight"):
        load_clap_teacher(bad)


def test_fusion_checkpoint_refused(laion_path, tmp_path):
    def edit(ckpt):
        ckpt["state_dict"]["module.audio_branch.patch_embed.mel_conv2d.weight"] = torch.zeros(16, 1, 4, 12)
        ckpt["state_dict"]["module.audio_branch.patch_embed.fusion_model.local_att.0.weight"] = torch.zeros(4)
    fusion = _rewrite(laion_path, str(tmp_path / "630k-fusion-best.pt"), edit)
    with pytest.raises(ClapCheckpointError, match="fusion") as err:
        load_clap_teacher(fusion)
    assert fusion in str(err.value)


@pytest.mark.parametrize("content", [
    {"cfg": {"model": {"_name": "supmam_clap"}}, "model": {"encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3)},
     "optimizer_history": []},  # this project's fairseq checkpoint layout
    {"weight": torch.zeros(2), "bias": torch.zeros(2)},
    torch.zeros(3),
], ids=["fairseq", "plain-dict", "tensor"])
def test_other_model_refused(tmp_path, content):
    path = str(tmp_path / "other.pt")
    torch.save(content, path)
    with pytest.raises(ClapCheckpointError, match="not a") as err:
        load_clap_teacher(path)
    assert path in str(err.value)


def test_unreadable_and_untrusted_files_refused(tmp_path, laion_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ClapCheckpointError, match="junk.pt"):
        load_clap_teacher(str(junk))

    # An object weights_only=True refuses (old training checkpoints pickle their argparse args).
    odd = _rewrite(laion_path, str(tmp_path / "odd.pt"), lambda c: c.__setitem__("args", argparse.Namespace(lr=1)))
    with pytest.raises(ClapCheckpointError, match=r"odd\.pt: holds pickled objects.*trusted=True"):
        load_clap_teacher(odd)  # refused by default
    assert load_clap_teacher(odd, trusted=True).dim == 128  # a deliberate full unpickle
    # numpy scalars (as released CLAP checkpoints hold) load weights-only, without trust
    scalars = _rewrite(laion_path, str(tmp_path / "np.pt"),
                       lambda c: c.update(epoch=np.int64(45), best=np.float64(0.9)))
    assert load_clap_teacher(scalars).dim == 128
    with pytest.raises(ClapCheckpointError, match="not found"):
        load_clap_teacher(str(tmp_path / "missing.pt"))


def test_layer_and_projection_arguments(laion_path):
    with pytest.raises(ValueError, match="layer"):
        load_clap_teacher(laion_path, "stage2")
    with pytest.raises(ValueError, match="projection"):
        load_clap_teacher(laion_path, "stage3", projection=True)


def test_wrong_input_length(laion_path):
    teacher = load_clap_teacher(laion_path)
    for bad in (torch.zeros(1, teacher.num_samples - 1), torch.zeros(teacher.num_samples)):
        with pytest.raises(ValueError, match="480000"):
            teacher(bad)


def test_filterbank_mismatch_warns(laion_path, tmp_path):
    def edit(ckpt):
        ckpt["state_dict"]["module.audio_branch.logmel_extractor.melW"] = mel_filterbank(48000, 1024, 64, 0, 8000)
    odd = _rewrite(laion_path, str(tmp_path / "fmax8k.pt"), edit)
    with pytest.warns(UserWarning, match="mel filterbank"):
        load_clap_teacher(odd)


# ----------------------------------------------------------------------------- frozen, deterministic


def test_frozen_eval_and_deterministic(laion_path):
    teacher = load_clap_teacher(laion_path)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert teacher.train() is teacher and teacher.train(True) is teacher
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    wav = _wav(teacher, 2).requires_grad_(True)
    out = teacher(wav)
    assert not out.requires_grad
    torch.testing.assert_close(load_clap_teacher(laion_path)(wav), out, atol=0, rtol=0)  # same bits
    # Clips do not interact (BatchNorm uses running statistics).
    torch.testing.assert_close(teacher(wav[1:]), out[1:], atol=1e-5, rtol=1e-5)
    # bf16 autocast around the call does not change the float32 result.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(teacher(wav), out, atol=0, rtol=0)


def test_file_sha256(tmp_path):
    data = os.urandom(3 * (1 << 20) + 123)  # spans several read chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- mel scale and edges


@pytest.mark.parametrize("sr,fmin,fmax", [(48000, 50, 14000), (32000, 50, 14000), (16000, 0, 8000)])
def test_mel_filterbank_matches_the_slaney_formula(sr, fmin, fmax):
    """Against the Slaney filterbank written out in numpy (tests/references.py), not torchaudio."""
    ref = slaney_mel_filterbank(sr, 1024, 64, fmin, fmax)
    got = mel_filterbank(sr, 1024, 64, fmin, fmax)
    assert got.shape == (513, 64) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-6, rtol=1e-4)
    # each filter's area-normalised peak sits at its mel point (2 / bandwidth in Hz at most)
    points = slaney_mel_to_hz(np.linspace(slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax), 66))
    assert (got.double().numpy().max(axis=0) <= 2 / (points[2:] - points[:-2]) + 1e-7).all()


def test_mel_scale_conversions():
    hz = torch.tensor([0.0, 50.0, 999.0, 1000.0, 1001.0, 4000.0, 14000.0], dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(hz)), hz)
    # published anchor points of the Slaney scale: 200/3 Hz per mel up to 1 kHz = 15 mel,
    # then 27 mels per factor 6.4 (6400 Hz = 42 mel)
    assert hz_to_mel(1000.0) == pytest.approx(15.0) and hz_to_mel(200.0) == pytest.approx(3.0)
    assert hz_to_mel(6400.0) == pytest.approx(42.0) and mel_to_hz(42.0) == pytest.approx(6400.0)
    np.testing.assert_allclose(hz_to_mel(hz).numpy(), slaney_hz_to_mel(hz.numpy()), rtol=1e-12)
    assert [hz_to_mel(float(f)) for f in hz] == pytest.approx(hz_to_mel(hz).tolist())


def _bin_centres_hz(sr, fmin, fmax, n_mels=64):
    """Centre frequency of each Slaney mel filter: the inner points of n_mels + 2 mel-equidistant
    points from fmin to fmax (the published definition, tests/references.py)."""
    return slaney_mel_to_hz(np.linspace(slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax), n_mels + 2))[1:-1]


def test_freq_edges(laion_path, msclap_path):
    laion = load_clap_teacher(laion_path)
    edges = laion.freq_edges_hz()
    assert len(edges) == 3 and edges[0] == pytest.approx(50) and edges[2] == pytest.approx(14000)
    assert edges[1] == pytest.approx(slaney_mel_to_hz((slaney_hz_to_mel(50.0) + slaney_hz_to_mel(14000.0)) / 2))
    assert edges[1] == pytest.approx(2293.0, abs=0.5)  # the README's 50 / 2293 / 14000 Hz

    stage3 = load_clap_teacher(laion_path, "stage3")
    edges = stage3.freq_edges_hz()
    assert len(edges) == 5 and edges == sorted(edges)
    assert [round(e) for e in edges] == [50, 941, 2293, 5587, 14000]  # as the README states
    centres = _bin_centres_hz(48000, 50, 14000)
    for k in range(1, 4):  # inner edge k between bin 16k - 1 (cell k - 1) and bin 16k (cell k)
        lo, hi = centres[16 * k - 1], centres[16 * k]
        assert lo < edges[k] < hi
        assert slaney_hz_to_mel(edges[k]) == pytest.approx((slaney_hz_to_mel(lo) + slaney_hz_to_mel(hi)) / 2, abs=1e-6)

    ms = load_clap_teacher(msclap_path, "stage3")
    nominal = [e * 32000 / 44100 for e in ms.freq_edges_hz()]
    assert nominal[0] == pytest.approx(50) and nominal[-1] == pytest.approx(14000)
    assert nominal[1:-1] == pytest.approx(stage3.freq_edges_hz()[1:-1])  # same mel grid, rescaled
    assert ms.freq_edges_hz()[-1] == pytest.approx(19293.75) and not math.isclose(ms.fmax, 14000)
