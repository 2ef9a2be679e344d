"""mam_clap_plugin.hear follows the HEAR 2021 API.

mam_clap_plugin.hear, the HEAR 2021 API: every shape and dtype rule for sounds of 0.1 s to
25 s in batches of 1 to 4, the timestamps (centres, 160 ms apart, within the sound, the same
for the whole batch), the scene embedding against examples/extract_features.py's clip-level
feature of the same audio, the layer and pooling options, the errors, and the module in a
process where fairseq, s3prl and huggingface_hub cannot be imported."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mam_clap_plugin import hear
from mam_clap_plugin.checkpoint import CheckpointError, save_encoder
from mam_clap_plugin.data.audio import load_audio
from mam_clap_plugin.features import num_steps
from mam_clap_plugin.modules.encoder import AudioEncoder

from .helpers import blocking_imports

REPO = Path(__file__).resolve().parents[1]
DIM, DEPTH, GRID_FREQ = 32, 2, 8
#: max_frames 256 (2.56 s windows): a 25 s sound is encoded as 10 windows.
CONFIG = {"embed_dim": DIM, "depth": DEPTH, "num_heads": 4, "mlp_ratio": 4.0, "max_frames": 256}
SECONDS = (0.1, 0.15, 0.16, 0.5, 1.07, 1.98, 2.56, 2.6, 4.0, 10.0, 25.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    encoder = AudioEncoder(**CONFIG).eval()
    with torch.no_grad():
        encoder.norm.weight.normal_(1.0, 0.1)
    path = tmp_path_factory.mktemp("hear") / "encoder.safetensors"
    save_encoder(str(path), encoder, CONFIG, -4.27, 4.57, "-4.27,4.57", 256, "random")
    return str(path)


@pytest.fixture(scope="module")
def model(export):
    return hear.load_model(export)


def expected_timestamps(num_samples):
    """Centres 160 i + 87.5 ms of the steps len(range(0, S, 2560)), kept while within the sound
    (at least one), computed here from the definition."""
    duration_ms = 1000 * num_samples / 16000
    centres = [160 * i + 87.5 for i in range(num_steps(num_samples))]
    return [c for c in centres if c <= duration_ms] or centres[:1]


def test_model_attributes(model):
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.sample_rate == 16000 and isinstance(model.sample_rate, int)
    assert model.scene_embedding_size == DIM and isinstance(model.scene_embedding_size, int)
    assert model.timestamp_embedding_size == DIM and isinstance(model.timestamp_embedding_size, int)


@pytest.mark.parametrize("seconds", SECONDS)
def test_shapes_dtypes_and_timestamps(model, seconds):
    """The API's rules (and the HEAR validator's checks) for batches of 1 to 4 sounds."""
    n_samples = int(round(seconds * 16000))
    want = expected_timestamps(n_samples)
    gen = torch.Generator().manual_seed(int(seconds * 100))
    audio = torch.rand(4, n_samples, generator=gen) * 2 - 1
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    scene = hear.get_scene_embeddings(audio, model)
    for batch in (1, 2, 3, 4):
        emb, ts = hear.get_timestamp_embeddings(audio[:batch], model)
        sc = hear.get_scene_embeddings(audio[:batch], model)
        assert emb.shape == (batch, len(want), model.timestamp_embedding_size)
        assert ts.shape == (batch, len(want))
        assert sc.shape == (batch, model.scene_embedding_size)
        assert emb.dtype == ts.dtype == sc.dtype == torch.float32
        assert emb.device == ts.device == sc.device == audio.device
        assert torch.isfinite(emb).all() and torch.isfinite(sc).all()
        assert all(torch.equal(ts[i], ts[0]) for i in range(batch))  # the same for every sound
        assert ts[0].tolist() == want
        # a sound's embeddings do not depend on the rest of the batch
        torch.testing.assert_close(emb, embeddings[:batch], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sc, scene[:batch], rtol=1e-5, atol=1e-5)
    ts = timestamps[0].numpy()
    assert ts[0] == 87.5  # the centre of the first step's 2800 samples
    if len(ts) > 1:
        assert np.all(np.diff(ts) == 160.0)
    duration_ms = 1000 * n_samples / 16000
    if duration_ms >= 87.5:
        assert ts[-1] <= duration_ms  # the validator refuses timestamps past the end
    assert ts[-1] >= duration_ms - 2 * 160  # ... and a last timestamp more than 2 hops before it


def test_device_and_dtype_of_the_input(model):
    audio = torch.rand(2, 8000, dtype=torch.float64) * 2 - 1
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    ref, _ = hear.get_timestamp_embeddings(audio.float(), model)
    assert emb.dtype == torch.float32 and torch.equal(emb, ref)


def test_scene_and_frames_equal_extract_features(export, model, tmp_path):
    """The scene embedding is examples/extract_features.py's --level clip feature of the same
    audio, the timestamp embeddings its --level frame rows (those with a timestamp)."""
    rng = np.random.default_rng(1)
    audio = tmp_path / "audio"
    audio.mkdir()
    lengths = {"short.wav": 0.3, "mid.wav": 3.0, "long.wav": 12.5}
    for name, seconds in lengths.items():
        t = np.arange(int(seconds * 16000)) / 16000
        x = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(str(audio / name), x.astype(np.float32), 16000, subtype="FLOAT")
    main = runpy.run_path(str(REPO / "examples" / "extract_features.py"))["main"]
    for level in ("clip", "frame"):
        assert main([str(audio), "--checkpoint", export, "--out", str(tmp_path / level), "--device", "cpu",
                     "--level", level]) == 0
    for name in lengths:
        wav = load_audio(str(audio / name))[None]
        scene = hear.get_scene_embeddings(wav, model)[0].numpy()
        np.testing.assert_allclose(scene, np.load(tmp_path / "clip" / f"{name}.npy"), rtol=1e-5, atol=1e-5)
        emb, ts = hear.get_timestamp_embeddings(wav, model)
        frames = np.load(tmp_path / "frame" / f"{name}.npy")
        assert frames.shape[0] == num_steps(wav.shape[1]) >= emb.shape[1] == ts.shape[1]
        np.testing.assert_allclose(emb[0].numpy(), frames[:emb.shape[1]], rtol=1e-5, atol=1e-5)


def test_layer_and_pooling_options(export, model):
    audio = torch.rand(3, 40000) * 2 - 1
    scene = hear.get_scene_embeddings(audio, model)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    every = hear.load_model(export, layer="all", freq_pool="concat")
    assert every.scene_embedding_size == (DEPTH + 1) * DIM
    assert every.timestamp_embedding_size == (DEPTH + 1) * GRID_FREQ * DIM
    all_scene = hear.get_scene_embeddings(audio, every)
    all_emb, all_ts = hear.get_timestamp_embeddings(audio, every)
    assert all_scene.shape == (3, (DEPTH + 1) * DIM)
    assert all_emb.shape == (3, ts.shape[1], (DEPTH + 1) * GRID_FREQ * DIM)
    assert torch.equal(all_ts, ts)
    for layer in range(DEPTH + 1):
        one = hear.load_model(export, layer=str(layer))  # the kit's --model-options may give text
        assert one.scene_embedding_size == one.timestamp_embedding_size == DIM
        torch.testing.assert_close(all_scene.view(3, DEPTH + 1, DIM)[:, layer], hear.get_scene_embeddings(audio, one))
        grid = all_emb.view(3, -1, DEPTH + 1, GRID_FREQ, DIM)[:, :, layer]
        torch.testing.assert_close(grid.mean(dim=2), hear.get_timestamp_embeddings(audio, one)[0])
    assert not torch.allclose(all_scene.view(3, DEPTH + 1, DIM)[:, DEPTH], scene)  # final = after the norm
    concat = hear.load_model(export, freq_pool="concat")
    grid = hear.get_timestamp_embeddings(audio, concat)[0].view(3, -1, GRID_FREQ, DIM)
    torch.testing.assert_close(grid.mean(dim=2), emb)
    torch.testing.assert_close(hear.get_scene_embeddings(audio, concat), scene)
    windowed = hear.load_model(export, window_frames=64, max_windows_per_batch=2)
    assert hear.get_timestamp_embeddings(audio, windowed)[0].shape == emb.shape


def test_errors(export, model, tmp_path):
    with pytest.raises(ValueError, match="load_model needs model_file_path: this module ships no weights"):
        hear.load_model()
    with pytest.raises(ValueError, match="needs model_file_path"):
        hear.load_model("")
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        hear.load_model(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="layer 3: the encoder has hidden states 0..2"):
        hear.load_model(export, layer=3)
    with pytest.raises(ValueError, match="layer 'last': use final, all or a number 0..2"):
        hear.load_model(export, layer="last")
    with pytest.raises(ValueError, match="freq_pool must be one of"):
        hear.load_model(export, freq_pool="max")
    with pytest.raises(ValueError, match="window_frames=100 must be a positive multiple of 16"):
        hear.load_model(export, window_frames=100)
    with pytest.raises(TypeError):
        hear.load_model(export, hop_ms=50)
    with pytest.raises(ValueError, match=r"audio must be a tensor \(n_sounds, n_samples\), got \(16000,\)"):
        hear.get_scene_embeddings(torch.zeros(16000), model)
    with pytest.raises(ValueError, match=r"audio of shape \(2, 0\): no sounds or no samples"):
        hear.get_timestamp_embeddings(torch.zeros(2, 0), model)


@pytest.mark.slow
def test_hear_module_without_fairseq_s3prl_or_huggingface_hub(export, tmp_path):
    """The HEAR kit imports the module by name: it loads and embeds where importing fairseq,
    s3prl or huggingface_hub raises."""
    code = (
        blocking_imports("fairseq", "s3prl", "huggingface_hub")
        + "import importlib, torch\n"
        "module = importlib.import_module('mam_clap_plugin.hear')\n"
        f"model = module.load_model({export!r})\n"
        "emb, ts = module.get_timestamp_embeddings(torch.rand(2, 17120) * 2 - 1, model)\n"
        "scene = module.get_scene_embeddings(torch.rand(4, 43840) * 2 - 1, model)\n"
        "print(tuple(emb.shape), tuple(ts.shape), tuple(scene.shape))\n"
        "assert not {'fairseq', 's3prl', 'huggingface_hub'} & set(sys.modules), sorted(sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == f"(2, 7, {DIM}) (2, 7) (4, {DIM})"
