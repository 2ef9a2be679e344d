"""Tests for mam_clap_plugin.data.audio: loading, fbank, normalisation, errors."""
import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from mam_clap_plugin.data.audio import (
    NORM_STATS,
    AudioError,
    frames_to_samples,
    load_audio,
    normalize_fbank,
    resolve_norm_stats,
    wav_to_fbank,
)


def write_wav(path, seconds, rate=16000, channels=1, seed=0, subtype=None):
    """Write random noise; returns the (frames, channels) float32 data written."""
    data = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(seconds * rate), channels)).astype(np.float32)
    soundfile.write(path, data, rate, subtype=subtype)
    return data


def direct_fbank(wav):
    """Reference: the AudioMAE call on the mean-removed waveform, without padding (the mean
    taken in float64, as wav_to_fbank does so that a clip's fbank does not depend on its batch)."""
    return torchaudio.compliance.kaldi.fbank(
        (wav - wav.double().mean().float())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)


def test_frames_to_samples():
    assert frames_to_samples(1024, 16000) == 164080  # 10.255 s
    assert frames_to_samples(1, 16000) == 400
    assert frames_to_samples(1024, 44100) == 452246  # 452245.5 rounded up


def test_fbank_shape_and_values_match_kaldi():
    wav = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, 160000).astype(np.float32))
    fbank = wav_to_fbank(wav)
    reference = direct_fbank(wav)
    assert fbank.shape == (1024, 128) and fbank.dtype == torch.float32
    assert reference.shape[0] == 998
    torch.testing.assert_close(fbank[:998], reference)
    assert torch.count_nonzero(fbank[998:]) == 0


def test_fbank_pads_and_crops():
    wav = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, 16000 * 12).astype(np.float32))
    cropped = wav_to_fbank(wav, target_length=1024)
    torch.testing.assert_close(cropped, direct_fbank(wav)[:1024])
    padded = wav_to_fbank(wav[:16000], target_length=200)
    assert padded.shape == (200, 128)
    assert torch.count_nonzero(padded[98:]) == 0 and torch.count_nonzero(padded[:98]) > 0


def test_fbank_of_waveform_shorter_than_one_window():
    fbank = wav_to_fbank(torch.rand(100), target_length=8)
    assert fbank.shape == (8, 128)
    assert torch.isfinite(fbank).all()
    assert torch.count_nonzero(fbank[0]) > 0 and torch.count_nonzero(fbank[1:]) == 0


def test_fbank_rejects_2d_input():
    with pytest.raises(ValueError, match="1-D"):
        wav_to_fbank(torch.zeros(2, 1000))


def test_load_mono_16k(tmp_path):
    data = write_wav(tmp_path / "a.wav", 1.0, subtype="FLOAT")
    wav = load_audio(str(tmp_path / "a.wav"))
    assert wav.dtype == torch.float32 and wav.shape == (16000,)
    np.testing.assert_array_equal(wav.numpy(), data[:, 0])


def test_load_resamples_44k_stereo_and_downmixes(tmp_path):
    write_wav(tmp_path / "ref.wav", 1.0, rate=16000)
    data = write_wav(tmp_path / "st.wav", 1.0, rate=44100, channels=2, subtype="FLOAT")
    wav = load_audio(str(tmp_path / "st.wav"))
    assert wav.shape == load_audio(str(tmp_path / "ref.wav")).shape == (16000,)
    expected = torchaudio.functional.resample(torch.from_numpy(data.mean(axis=1)), 44100, 16000)
    torch.testing.assert_close(wav, expected)


def test_load_max_frames_reads_only_the_start(tmp_path):
    data = write_wav(tmp_path / "long.wav", 20.0, subtype="FLOAT")
    wav = load_audio(str(tmp_path / "long.wav"), max_frames=1024)
    assert wav.shape == (164080,)
    np.testing.assert_array_equal(wav.numpy(), data[:164080, 0])
    write_wav(tmp_path / "long44.wav", 11.0, rate=44100)
    wav44 = load_audio(str(tmp_path / "long44.wav"), max_frames=1024)
    assert 164080 <= wav44.shape[0] <= 164082
    assert direct_fbank(wav44).shape[0] == 1024  # exactly enough audio, no padding needed


def test_normalize_formula():
    fbank = torch.tensor([[-4.0, 0.0], [2.0, 6.0]])
    torch.testing.assert_close(normalize_fbank(fbank, 2.0, 4.0), (fbank - 2.0) / 8.0)
    assert normalize_fbank(fbank, 2.0, 4.0)[0, 0].item() == pytest.approx(-0.75)


def test_resolve_norm_stats():
    assert resolve_norm_stats("esc50") == NORM_STATS["esc50"]
    assert resolve_norm_stats("-1.5, 2") == (-1.5, 2.0)
    with pytest.raises(ValueError, match="audioset, esc50, speech_commands"):
        resolve_norm_stats("librispeech")
    with pytest.raises(ValueError, match="std > 0"):
        resolve_norm_stats("1,0")


def test_error_missing_file(tmp_path):
    path = str(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="not found") as err:
        load_audio(path, where="/m/train.tsv:7")
    assert path in str(err.value) and "/m/train.tsv:7" in str(err.value)


def test_error_corrupt_file(tmp_path):
    path = tmp_path / "bad.wav"
    path.write_bytes(np.random.default_rng(3).bytes(2000))
    with pytest.raises(AudioError, match="cannot read audio") as err:
        load_audio(str(path), max_frames=10, where="x.tsv:3")
    assert str(path) in str(err.value) and "x.tsv:3" in str(err.value)


def test_error_empty_file(tmp_path):
    path = str(tmp_path / "empty.wav")
    soundfile.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty") as err:
        load_audio(path, where="x.tsv:4")
    assert path in str(err.value) and "x.tsv:4" in str(err.value)


def test_error_nan_samples(tmp_path):
    path = str(tmp_path / "nan.wav")
    data = np.zeros(1600, dtype=np.float32)
    data[100] = np.nan
    soundfile.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN") as err:
        load_audio(path, where="x.tsv:5")
    assert path in str(err.value) and "x.tsv:5" in str(err.value)


def test_error_without_where_names_the_file(tmp_path):
    path = str(tmp_path / "nope.wav")
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert str(err.value).startswith(path)
