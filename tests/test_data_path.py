"""The training data path: batched fbank, fbank on the device, targets and arrays through the loader.

One batched fbank (equal to torchaudio's Kaldi fbank for clips of any length in one batch),
``task.fbank_on_device`` (workers send waveforms, the batch's fbank equals the workers' one),
offline targets crossing the loader as the store's fp16 maps, cached resampling kernels and mel
matrix, manifests and labels in numpy arrays, and a fairseq-hydra-train run whose losses do not
depend on where the fbank is computed."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchaudio

from mam_clap_plugin.data import audio
from mam_clap_plugin.data.audio import batch_fbank, resampler, wav_to_fbank, write_wav
from mam_clap_plugin.data.dataset import MamClapDataset, on_device
from mam_clap_plugin.data.manifest import PackedRows, read_labels, read_manifest, write_labels, write_manifest
from mam_clap_plugin.data.target_store import create_target_store, open_target_store
from mam_clap_plugin.hydra_runs import run_hydra_train

from .conftest import CONFIG_DIR, store_header


def kaldi(wav: torch.Tensor, target_length: int) -> torch.Tensor:
    """The reference: AudioMAE's torchaudio call on the mean-removed clip, padded or cropped.

    The mean is taken in float64 as ``batch_fbank`` does: a float32 mean's last bit, which
    depends on how torch splits the sum, moves near-silent mel bins (energy at float32's
    rounding floor) by up to 1e-3 in either implementation."""
    wav = wav - wav.double().mean().float()
    if wav.shape[0] < 400:
        wav = torch.nn.functional.pad(wav, (0, 400 - wav.shape[0]))
    fb = torchaudio.compliance.kaldi.fbank(wav[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                                           window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    return torch.nn.functional.pad(fb, (0, 0, 0, max(0, target_length - fb.shape[0])))[:target_length]


def _batch(lengths, seed=0):
    rng = np.random.default_rng(seed)
    clips = [torch.from_numpy((0.3 * rng.standard_normal(n) + 0.1).astype(np.float32)) for n in lengths]
    wavs = torch.zeros(len(clips), max(lengths))
    for row, clip in zip(wavs, clips):
        row[: clip.shape[0]] = clip
    return clips, wavs


def test_batch_fbank_equals_kaldi_for_clips_of_every_length_in_one_batch():
    # cropped (longer than 1024 frames), exactly 1024 frames, padded, one window, shorter than one window
    lengths = [170000, 164080, 16000, 400, 250, 561]
    clips, wavs = _batch(lengths)
    out = batch_fbank(wavs, torch.tensor(lengths), 1024)
    assert out.shape == (6, 1024, 128) and out.dtype == torch.float32
    for i, clip in enumerate(clips):
        torch.testing.assert_close(out[i], kaldi(clip, 1024), atol=1e-4, rtol=0)
        # the workers' one-clip form (task.fbank_on_device=false) is the same function
        torch.testing.assert_close(wav_to_fbank(clip, 1024), out[i], atol=1e-5, rtol=0)
    assert torch.count_nonzero(out[2, 98:]) == 0 and torch.count_nonzero(out[3, 1:]) == 0
    # a batch narrower than one window, and a crop below the batch's frame count
    short = batch_fbank(wavs[3:5, :400], torch.tensor([400, 250]), 8)
    torch.testing.assert_close(short, torch.stack([kaldi(clips[3], 8), kaldi(clips[4], 8)]), atol=1e-4, rtol=0)


def test_mel_matrix_and_resampling_kernels_are_built_once():
    audio._fbank_constants.cache_clear()
    batch_fbank(torch.randn(2, 2000), None, 16)
    wav_to_fbank(torch.randn(3000), 16)
    info = audio._fbank_constants.cache_info()
    assert info.misses == 1 and info.hits == 1
    assert resampler(44100, 16000) is resampler(44100, 16000)
    x = torch.randn(44100)
    assert torch.equal(resampler(44100, 16000)(x), torchaudio.functional.resample(x, 44100, 16000))


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    """Clips in the three benchmark formats, cropped, padded and shorter than a window
    (target_length 128 = 1.28 s), with a target store and labels."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    specs = [(44100, 2, 2.0), (48000, 2, 0.5), (16000, 1, 0.02), (44100, 2, 0.7), (16000, 1, 1.5)]
    names, sizes = [], []
    for i, (rate, channels, seconds) in enumerate(specs):
        n = int(rate * seconds)
        data = 0.3 * np.sin(2 * np.pi * 330 * (i + 1) * np.arange(n) / rate)[:, None] \
            + 0.05 * rng.standard_normal((n, channels))
        write_wav(root / f"c{i}.wav", data.astype(np.float32), rate)
        names.append(f"c{i}.wav")
        sizes.append(n)
    write_manifest(str(root / "train.tsv"), str(root), names, sizes)
    write_labels(str(root / "train.lbl"), [[0], [1, 2], [2], [0, 1], [1]])
    with create_target_store(str(root / "train.tgt"), store_header(len(names), dim=6)) as writer:
        for i in range(len(names)):
            writer.write(i, rng.standard_normal((2, 32, 6)))
    return root


def _datasets(root, **kw):
    manifest = read_manifest(str(root / "train.tsv"))
    store = open_target_store(str(root / "train.tgt"))
    common = dict(target_length=128, norm_mean=-4.0, norm_std=4.5, labels=read_labels(str(root / "train.lbl"), 5, 3),
                  num_classes=3, target_store=store, alignment=store.header.alignment(8, 8), shuffle=False)
    return MamClapDataset(manifest, **common), MamClapDataset(manifest, fbank_on_device=True, **common), store


def test_fbank_on_device_gives_the_workers_batch(mixed_set):
    workers, device, store = _datasets(mixed_set)
    cpu = workers.collater([workers[i] for i in range(5)])
    raw = device.collater([device[i] for i in range(5)])
    assert "net_input" not in raw and raw["audio"].dtype == torch.int32  # float32 bits
    # the clips at their own rates, read as far as 128 frames need (1.295 s): 2 s at 44.1 kHz -> 57110 samples,
    # 20 ms at 16 kHz -> 320 (shorter than a window); the rates stay a host-side list (no sync to group them)
    lengths = raw["audio_lengths"].tolist()
    assert raw["audio"].shape == (5, max(lengths)) and lengths[0] == 57110 and lengths[2] == 320
    assert raw["audio_rates"] == [44100, 48000, 16000, 44100, 16000]
    finished = on_device(dict(raw), 128, -4.0, 4.5, device.alignment)
    torch.testing.assert_close(finished["net_input"]["source"], cpu["net_input"]["source"], atol=1e-4, rtol=0)
    assert torch.equal(finished["target_mask"], cpu["target_mask"]) and torch.equal(finished["label"], cpu["label"])
    # the offline targets: the store's fp16 map per clip crosses the loader, aligned on the device
    assert cpu["target"].dtype == torch.float16 and cpu["target"].shape == (5, 2, 32, 6)
    assert cpu["target"][0].numel() * cpu["target"].element_size() == store.header.clip_bytes
    aligned = on_device(cpu, 128, -4.0, 4.5, workers.alignment)["target"]
    index = workers.alignment.index.numpy()
    expected = np.stack([store[i].reshape(-1, 6)[index].astype(np.float32) for i in range(5)])
    assert aligned.dtype == torch.float32 and torch.equal(aligned, torch.from_numpy(expected))
    # finishing twice changes nothing (fairseq re-runs a step after an overflow or a NaN)
    again = on_device(finished, 128, -4.0, 4.5, device.alignment)
    assert again["target"].shape == (5, 64, 6)
    # the model's dtype, as fairseq's own cast of net_input under common.bf16
    half = on_device(device.collater([device[0]]), 128, -4.0, 4.5, device.alignment, torch.bfloat16)
    assert half["net_input"]["source"].dtype == torch.bfloat16
    # the waveform crosses as int32 bits: fairseq's fp16/bf16 batch cast leaves it exact
    from fairseq.utils import apply_to_sample

    plain = on_device(device.collater([device[0]]), 128, -4.0, 4.5, device.alignment)
    batch = device.collater([device[0]])
    assert batch["audio"].dtype == torch.int32
    cast = apply_to_sample(lambda t: t.half() if t.dtype is torch.float32 else t, batch)
    half_cast = on_device(cast, 128, -4.0, 4.5, device.alignment)
    assert torch.equal(half_cast["net_input"]["source"], plain["net_input"]["source"])


def test_fbank_on_device_workers_only_decode(mixed_set, monkeypatch):
    """With fbank_on_device a worker builds no resampler and computes no fbank."""
    _, device, _ = _datasets(mixed_set)

    def refuse(*args, **kwargs):
        raise AssertionError("a worker resampled or computed an fbank")

    monkeypatch.setattr(audio, "resampler", refuse)
    monkeypatch.setattr(audio, "batch_fbank", refuse)
    items = [device[i] for i in range(5)]
    assert [item["rate"] for item in items] == [44100, 48000, 16000, 44100, 16000]
    assert all("source" not in item and item["audio"].dtype == torch.float32 for item in items)


def test_batch_resample_equals_torchaudio_per_clip():
    """Mixed rates and lengths in one zero-padded batch, each row as torchaudio resamples the clip alone."""
    rng = np.random.default_rng(3)
    specs = [(44100, 44100), (48000, 9000), (16000, 5000), (44100, 300), (22050, 22050)]
    clips = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for _, n in specs]
    wavs = torch.zeros(len(clips), max(n for _, n in specs))
    for row, clip in zip(wavs, clips):
        row[: clip.shape[0]] = clip
    wavs[1, 9000:] = 7.0  # samples past a clip's length are ignored
    lengths = torch.tensor([n for _, n in specs])
    out, out_lengths = audio.batch_resample(wavs, lengths, [r for r, _ in specs], 16000)
    for i, ((rate, n), clip) in enumerate(zip(specs, clips)):
        expected = torchaudio.functional.resample(clip, rate, 16000)
        assert out_lengths[i] == expected.shape[0] == audio.resampled_length(n, rate, 16000)
        torch.testing.assert_close(out[i, : expected.shape[0]], expected, atol=1e-5, rtol=0)
        assert torch.count_nonzero(out[i, expected.shape[0]:]) == 0
    # a fixed width crops or pads (the teacher's num_samples), and the lengths are capped
    short, capped = audio.batch_resample(wavs, lengths, [r for r, _ in specs], 48000, width=1000)
    assert short.shape == (5, 1000) and capped.max() == 1000
    with pytest.raises(ValueError, match="2 sample rates for a batch of 5"):
        audio.batch_resample(wavs, lengths, [16000, 16000], 16000)


def test_fbank_on_device_gives_the_online_teachers_input(mixed_set):
    """An online teacher at 48 kHz, 2 s (longer than the student's 1.295 s): the device-side teacher input
    from the one native read equals the workers' load_student_and_teacher_audio, and so do the student's
    fbanks."""
    from mam_clap_plugin.modules.precision import exact

    manifest = read_manifest(str(mixed_set / "train.tsv"))
    common = dict(target_length=128, norm_mean=-4.0, norm_std=4.5, teacher_input=(48000, 96000),
                  alignment=open_target_store(str(mixed_set / "train.tgt")).header.alignment(8, 8), shuffle=False)
    workers = MamClapDataset(manifest, **common)
    device = MamClapDataset(manifest, fbank_on_device=True, **common)
    cpu = workers.collater([workers[i] for i in range(5)])
    raw = device.collater([device[i] for i in range(5)])
    assert "teacher_wav" not in raw and raw["teacher_audio_lengths"][0] == 88200  # all of a 2 s clip at 44.1 kHz
    assert raw["audio_lengths"][0] == 57110  # the student's 1.295 s of it
    with pytest.raises(ValueError, match="no teacher_input"):
        on_device(raw, 128, -4.0, 4.5, device.alignment)
    assert "audio" in raw and "net_input" not in raw  # refused before anything was changed
    finished = on_device(raw, 128, -4.0, 4.5, device.alignment, teacher_input=(48000, 96000))
    assert finished["teacher_wav"].shape == (5, 96000) and finished["teacher_wav"].dtype == torch.float32
    torch.testing.assert_close(finished["teacher_wav"], exact(cpu["teacher_wav"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(finished["net_input"]["source"], cpu["net_input"]["source"], atol=1e-4, rtol=0)
    assert torch.equal(finished["target_mask"], cpu["target_mask"])


@pytest.mark.parametrize("rows", [[0, 3], [0, 1, 2, 3, 4]], ids=["one_rate", "mixed_rates"])
def test_on_device_finishes_a_batch_without_a_sync(mixed_set, request, rows):
    """Resampling, fbank, normalisation and the offline targets' alignment read nothing back from
    the device: the rates are a host-side list and every shape comes from the batch's shapes."""
    _, device, _ = _datasets(mixed_set)
    raw = device.collater([device[i] for i in rows])
    expected = on_device(dict(raw), 128, -4.0, 4.5, device.alignment)  # builds the per-device caches first
    request.getfixturevalue("no_syncs")
    finished = on_device(dict(raw), 128, -4.0, 4.5, device.alignment)
    assert torch.equal(finished["net_input"]["source"], expected["net_input"]["source"])
    assert torch.equal(finished["target"], expected["target"])


def test_manifest_and_labels_live_in_numpy_arrays(mixed_set):
    manifest = read_manifest(str(mixed_set / "train.tsv"))
    assert isinstance(manifest.paths, PackedRows) and manifest.paths.values.dtype == np.uint8
    assert manifest.sizes.dtype == np.int64 and manifest.sizes[0] == 88200
    assert manifest.paths == [f"c{i}.wav" for i in range(5)] and manifest.paths[-1] == "c4.wav"
    assert manifest.full_path(np.int64(3)) == os.path.join(str(mixed_set), "c3.wav")
    labels = read_labels(str(mixed_set / "train.lbl"), 5, 3)
    assert labels == [[0], [1, 2], [2], [0, 1], [1]] and labels[1].dtype == np.int64
    # a worker receives two arrays per field, not one Python object per clip
    big = PackedRows.of_strings([f"unbalanced/{i:07d}_10.000.wav" for i in range(20000)])
    assert len(pickle.dumps(big)) < 1.1 * (big.values.nbytes + big.offsets.nbytes)
    assert PackedRows.of_strings(["é/ü.wav"])[0] == "é/ü.wav"


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["offline", "online"])
def test_training_losses_do_not_depend_on_where_the_fbank_runs(tone_set, clap_checkpoint, tmp_path, teacher):
    """fairseq-hydra-train, SupMAM-CLAP, same seed, one worker process: the workers' path vs
    task.fbank_on_device (resampling and fbank on the device; with the online teacher, its
    input resampled there too); labels in both. Training and validation losses agree. (The
    same number of workers in both: starting workers draws from torch's RNG, which moves
    validation's masks.)"""
    source = (f"task.target_store={os.path.join(tone_set, 'targets')}" if teacher == "offline"
              else f"task.teacher_checkpoint={clap_checkpoint}")
    base = ["+size=tiny", "task.target_length=64", "common.cpu=true", "common.log_interval=1",
            "dataset.batch_size=4", "optimization.update_freq=[1]", "optimization.max_update=3",
            "lr_scheduler.warmup_updates=1", f"task.data={tone_set}", source,
            "checkpoint.save_interval_updates=0", "dataset.num_workers=1"]
    workers = run_hydra_train(CONFIG_DIR, "supmam_clap", base + [f"checkpoint.save_dir={tmp_path / 'a'}"],
                              tmp_path / "a")
    device = run_hydra_train(CONFIG_DIR, "supmam_clap",
                             base + ["task.fbank_on_device=true", f"checkpoint.save_dir={tmp_path / 'b'}"],
                             tmp_path / "b")
    assert ("online teacher" in device.text) == (teacher == "online")
    assert len(workers.losses()) == len(device.losses()) == 3
    assert device.losses() == pytest.approx(workers.losses(), rel=1e-4)
    assert device.records["valid"][-1]["valid_loss"] == pytest.approx(workers.records["valid"][-1]["valid_loss"],
                                                                      rel=1e-4)
