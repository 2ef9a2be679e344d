"""Parity of the HTS-AT teacher with the reference implementations on the same random weights.

References (requirements-parity.txt, installed with --no-deps): LAION-CLAP 1.1.7's
``HTSAT_Swin_Transformer`` and MS-CLAP 1.3.4's ``AudioEncoder`` (HTS-AT + projection), both on
torchlibrosa 0.1.0. Their heavy imports (librosa, torchvision, h5py, transformers) are stubbed
in ``sys.modules`` only while the reference modules are imported. The stub's mel filterbank is
torchaudio's Slaney filterbank and its window scipy's, so the STFT/mel weights the references
build are an independent check of the ones ``save_random_clap_checkpoint`` writes.

Real HTSAT-tiny shapes, random init; a batch of two random clips (10 s at 48 kHz for LAION,
7 s at 44.1 kHz for MS-CLAP); tolerance 1e-4 absolute on every map.
"""
import importlib.util
import os
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch
import torchaudio
from torch import nn

from mam_clap_fixtures.clap import save_random_clap_checkpoint
from mam_clap_plugin.teacher import load_clap_teacher

TOL = 1e-4
# The reference HTS-AT calls torch.meshgrid without indexing=.
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")


def _librosa_stub() -> types.ModuleType:
    import scipy.signal

    def mel(sr, n_fft, n_mels=128, fmin=0.0, fmax=None, **_):
        fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, float(fmin), float(fmax or sr / 2), n_mels,
                                                   sr, norm="slaney", mel_scale="slaney")
        return fb.T.double().numpy()  # (n_mels, n_freq) like librosa

    def pad_center(data, size, **_):
        lpad = (size - len(data)) // 2
        return np.pad(data, (lpad, size - len(data) - lpad))

    librosa = types.ModuleType("librosa")
    librosa.filters = types.SimpleNamespace(mel=mel, get_window=scipy.signal.get_window)
    librosa.util = types.SimpleNamespace(pad_center=pad_center)
    return librosa


def _load_package(alias: str, directory: str, modules: list[str]) -> dict[str, types.ModuleType]:
    """Import ``directory/<m>.py`` as ``alias.<m>`` without running the package's __init__."""
    pkg = types.ModuleType(alias)
    pkg.__path__ = [directory]
    sys.modules[alias] = pkg
    loaded = {}
    for name in modules:
        spec = importlib.util.spec_from_file_location(f"{alias}.{name}", os.path.join(directory, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded


@pytest.fixture(scope="module")
def references():
    """(LAION htsat module, msclap clap module), imported with stubbed heavy dependencies."""
    def package_dir(name):
        spec = importlib.util.find_spec(name)  # does not run the package's __init__
        assert spec is not None, f"{name} is not installed: pip install --no-deps -r requirements-parity.txt"
        return spec.submodule_search_locations[0]

    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = nn.BatchNorm2d
    stubs = {"librosa": _librosa_stub(), "torchvision": types.ModuleType("torchvision"),
             "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc,
             "h5py": types.ModuleType("h5py"), "transformers": types.ModuleType("transformers")}
    stubs["transformers"].AutoModel = None
    with mock.patch.dict(sys.modules, stubs):
        for name in [m for m in sys.modules if m == "torchlibrosa" or m.startswith("torchlibrosa.")]:
            del sys.modules[name]  # re-import against the stub (patch.dict restores the originals)
        laion = _load_package("_ref_laion_clap", os.path.join(package_dir("laion_clap"), "clap_module"),
                              ["htsat"])["htsat"]
        msclap = _load_package("_ref_msclap", os.path.join(package_dir("msclap"), "models"),
                               ["config", "pytorch_utils", "htsat", "audio", "clap"])["clap"]
    return laion, msclap


def _regroup(x: torch.Tensor, ratio: int = 4) -> torch.Tensor:
    """LAION forward_features' regrouping of (B, H*W, C) tokens, returned as (B, Fc, T, C)."""
    B, N, C = x.shape
    side = int(N ** 0.5)
    x = x.permute(0, 2, 1).reshape(B, C, side, side)
    c_freq_bin = side // ratio
    x = x.reshape(B, C, side // c_freq_bin, c_freq_bin, side).permute(0, 1, 3, 2, 4).reshape(B, C, c_freq_bin, -1)
    return x.permute(0, 2, 3, 1)


def _capture(htsat: nn.Module) -> dict:
    """Hooks grabbing the reference's final map (the tscam_conv input) and stage-3 tokens."""
    seen = {}
    htsat.tscam_conv.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0].permute(0, 2, 3, 1)))
    htsat.layers[2].downsample.register_forward_pre_hook(lambda m, a: seen.__setitem__("stage3", _regroup(a[0])))
    return seen


def _compare(name, ours, ref, record_property):
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    diff = (ours - ref).abs().max().item()
    print(f"{name}: max |ours - reference| = {diff:.3g} (scale {ref.abs().max().item():.3g})")
    record_property(f"max_abs_diff_{name}", diff)
    assert diff <= TOL, f"{name}: max abs difference {diff:.3g} > {TOL}"


def _check_front_end_weights(ref_state: dict, ckpt_audio: dict):
    """The reference's own STFT/mel weights (built before loading) equal the checkpoint's."""
    for key in ("spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
                "logmel_extractor.melW"):
        torch.testing.assert_close(ckpt_audio[key], ref_state[key], atol=1e-6, rtol=1e-5, msg=key)


def test_laion_htsat_tiny_parity(tmp_path, references, record_property):
    laion, _ = references
    path = save_random_clap_checkpoint(str(tmp_path / "laion.pt"), "laion", "tiny", seed=1)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    audio = {k[len("module.audio_branch."):]: v for k, v in state.items() if k.startswith("module.audio_branch.")}

    cfg = types.SimpleNamespace(mel_bins=64, window_size=1024, hop_size=480, sample_rate=48000, fmin=50, fmax=14000)
    torch.manual_seed(0)
    ref = laion.HTSAT_Swin_Transformer(spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=527,
                                       embed_dim=96, depths=[2, 2, 6, 2], num_heads=[4, 8, 16, 32],
                                       window_size=8, config=cfg)
    _check_front_end_weights(ref.state_dict(), audio)
    ref.load_state_dict(audio, strict=True)  # our key names are exactly LAION's module tree
    ref.eval()
    seen = _capture(ref)

    wav = 0.1 * torch.randn(2, 480000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref({"waveform": wav}, device="cpu")
    final = load_clap_teacher(path, "final")
    stage3 = load_clap_teacher(path, "stage3")
    assert final.name == "laion-clap-htsat-tiny" and final.num_samples == 480000
    _compare("laion_final", final(wav), seen["final"], record_property)
    _compare("laion_stage3", stage3(wav), seen["stage3"], record_property)


def test_msclap_htsat_tiny_parity(tmp_path, references, record_property):
    _, msclap = references
    path = save_random_clap_checkpoint(str(tmp_path / "msclap.pt"), "msclap", "tiny", seed=3)
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    audio = {k[len("audio_encoder."):]: v for k, v in state.items() if k.startswith("audio_encoder.")}

    # What msclap's CLAPWrapper builds from configs/config_2023.yml (HTSATWrapper then ignores
    # these audio settings and uses msclap/models/config.py: 32 kHz, hop 320, 50-14000 Hz).
    torch.manual_seed(0)
    ref = msclap.AudioEncoder("HTSAT", d_in=768, d_out=1024, sample_rate=44100, window_size=1024, hop_size=320,
                              mel_bins=64, fmin=50, fmax=8000, classes_num=527)
    htsat = ref.base.htsat
    _check_front_end_weights({k[len("base.htsat."):]: v for k, v in ref.state_dict().items()},
                             {k[len("base.htsat."):]: v for k, v in audio.items() if k.startswith("base.htsat.")})
    ref.load_state_dict(audio, strict=True)
    ref.eval()
    seen = _capture(htsat)

    wav = 0.1 * torch.randn(2, 7 * 44100, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref(wav)
        ref_projected = ref.projection(seen["final"])  # msclap's Projection, applied per token
    final = load_clap_teacher(path, "final")
    assert final.name == "ms-clap-2023-htsat-tiny" and final.num_samples == wav.shape[1]
    _compare("msclap_final", final(wav), seen["final"], record_property)
    # (stage 3 runs the same code as LAION's, checked above.)
    _compare("msclap_projection", load_clap_teacher(path, "final", projection=True)(wav), ref_projected,
             record_property)
