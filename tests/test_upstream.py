"""The s3prl upstream (upstream/expert.py, upstream/hubconf.py), the encoder export, its benchmark.

Tiny encoders (2 layers, 32 dims, max_frames 1024) saved as a fairseq-layout pretraining
checkpoint (written by fairseq-hydra-train: the tests that use it are slow) and as an encoder
export; s3prl's own upstream contract (S3PRLUpstream and the legacy Featurizer) runs against
them with the compat shims installed; the upstream benchmark's smoke run.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mam_clap_plugin.checkpoint import (
    EXPORT_FORMAT,
    CheckpointError,
    export_encoder,
    load_encoder,
    load_encoder_with_stats,
)
from mam_clap_plugin.data.audio import NORM_STATS, normalize_fbank, wav_to_fbank
from mam_clap_plugin.modules.encoder import AudioEncoder
from upstream.expert import DOWNSAMPLE_RATE, UpstreamExpert, num_steps

from .conftest import PRETRAINED_DEPTH, PRETRAINED_DIM
from .helpers import blocking_imports

REPO = Path(__file__).resolve().parents[1]
SR = 16000
DIM, DEPTH = PRETRAINED_DIM, PRETRAINED_DEPTH


@pytest.fixture(autouse=True, scope="module")
def _process_state():
    """One torch thread here: these tiny models are dominated by per-op overhead, which extra
    threads only add to on a loaded 2-core machine (10x slower measured). And
    install_shims() adds argparse.Namespace to torch's weights-only allow-list for the
    process; both are undone after this module so other tests see torch's defaults."""
    threads = torch.get_num_threads()
    safe = list(torch.serialization.get_safe_globals())
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(safe)


@pytest.fixture(scope="module")
def ckpts(pretraining_checkpoint, tmp_path_factory):  # trains: the tests using it are slow (conftest)
    """(checkpoint written by fairseq-hydra-train, its encoder export, the encoder) of one tiny
    pretrained encoder."""
    export_path = tmp_path_factory.mktemp("upstream") / "encoder.pt"
    export_encoder(pretraining_checkpoint, str(export_path))
    encoder = load_encoder(pretraining_checkpoint).eval()
    # 4 updates at lr 0.01 moved the weights off their initial values, so mistakes show
    assert (encoder.norm.weight - 1).abs().max() > 1e-3 and encoder.patch_embed.bias.abs().max() > 1e-3
    return pretraining_checkpoint, str(export_path), encoder


@pytest.fixture(scope="module")
def expert(ckpts):
    return UpstreamExpert(ckpts[1]).eval()


def wav(seconds, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(max(1, round(seconds * SR)), generator=g)


# ---------------------------------------------------------------------------- export


def test_export_holds_config_weights_and_stats(ckpts):
    fairseq_path, export_path, encoder = ckpts
    state = torch.load(export_path, map_location="cpu", weights_only=True)  # plain types only
    assert state["format"] == EXPORT_FORMAT and state["version"] == 1
    assert state["encoder_config"] == {"embed_dim": DIM, "depth": DEPTH, "num_heads": 4, "mlp_ratio": 4.0,
                                       "max_frames": 1024, "num_mel_bins": 128}
    mean, std = NORM_STATS["speech_commands"]
    assert state["norm_stats"] == {"mean": mean, "std": std, "spec": "speech_commands"}
    assert state["target_length"] == 128
    assert not any(k.startswith(("encoder.", "decoder.", "head.")) for k in state["model"])
    for path in (fairseq_path, export_path):
        bundle = load_encoder_with_stats(path)
        assert (bundle.norm_mean, bundle.norm_std, bundle.target_length) == (mean, std, 128)
        for k, v in encoder.state_dict().items():
            assert torch.equal(bundle.encoder.state_dict()[k], v), k
    assert isinstance(load_encoder(export_path), AudioEncoder)


@pytest.mark.slow
def test_export_cli_and_loading_without_fairseq(ckpts, tmp_path):
    """examples/export_encoder.py, then the expert on its output, with fairseq unimportable."""
    fairseq_path, _, _ = ckpts
    out = tmp_path / "cli.pt"
    code = (
        blocking_imports("fairseq")
        + "import runpy\n"
        f"sys.argv = ['export_encoder.py', {fairseq_path!r}, {str(out)!r}]\n"
        "try:\n"
        "    runpy.run_path('examples/export_encoder.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "import torch\n"
        "from upstream.expert import UpstreamExpert\n"
        f"up = UpstreamExpert({str(out)!r}).eval()\n"
        "print('steps', up([torch.zeros(16000)])['hidden_states'][0].shape[1])\n"
        "assert 'fairseq' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"spec": "speech_commands"' in proc.stdout and proc.stdout.split()[-1] == "7"


@pytest.mark.slow
def test_missing_checkpoint_is_an_error_under_python_O(tmp_path):
    """A real exception, not an assert that ``python -O`` strips."""
    code = ("from upstream.hubconf import supmam_clap_local\n"
            "try:\n"
            f"    supmam_clap_local({str(tmp_path / 'missing.pt')!r})\n"
            "except FileNotFoundError as e:\n"
            "    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-O", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused: supmam_clap_local: checkpoint not found") and "missing.pt" in proc.stdout


def test_export_cli_errors(tmp_path, capsys):
    import runpy

    main = runpy.run_path(str(REPO / "examples" / "export_encoder.py"))["main"]
    assert main([str(tmp_path / "no.pt"), str(tmp_path / "x.pt")]) == 1
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_pretraining_and_export_give_the_same_features(ckpts, expert):
    from_ckpt = UpstreamExpert(ckpts[0]).eval()
    x = [wav(1.3, 1), wav(0.4, 2)]
    with torch.no_grad():
        a, b = from_ckpt(x), expert(x)
    for h1, h2 in zip(a["hidden_states"] + [a["last_hidden_state"]], b["hidden_states"] + [b["last_hidden_state"]]):
        assert torch.equal(h1, h2)


# ---------------------------------------------------------------------------- shapes and lengths


def test_hidden_states_shapes_and_rate(expert, ckpts):
    lens = [round(0.05 * SR), SR, 25 * SR]
    with torch.no_grad():
        out = expert([wav(n / SR, i) for i, n in enumerate(lens)])
    assert expert.get_downsample_rates("hidden_states") == DOWNSAMPLE_RATE == 2560
    assert expert.get_downsample_rates("last_hidden_state") == 2560
    hs = out["hidden_states"]
    assert len(hs) == DEPTH + 1
    expected = [len(range(0, n, 2560)) for n in lens]
    assert expected == [1, 7, 157]
    for h in hs + [out["last_hidden_state"]]:
        assert h.shape == (3, max(expected), DIM)
        assert torch.isfinite(h).all()
    # padding beyond each clip's length is zero
    for i, n in enumerate(expected):
        assert (hs[-1][i, n:] == 0).all()
    # concat pooling: H = 8 * D
    cat = UpstreamExpert(ckpts[1], freq_pool="concat").eval()
    with torch.no_grad():
        h = cat([wav(1.0)])["hidden_states"]
    assert len(h) == DEPTH + 1 and h[0].shape == (1, 7, 8 * DIM)


@pytest.mark.parametrize("samples", [1, 399, 400, 800, 2560, 2561, 16000, 163840, 163841])
def test_each_clip_has_s3prl_length(expert, samples):
    with torch.no_grad():
        out = expert([wav(samples / SR)])
    assert out["hidden_states"][0].shape[1] == num_steps(samples) == len(range(0, samples, 2560))


def test_padded_batch_equals_each_clip_alone(expert):
    clips = [wav(s, i) for i, s in enumerate([0.05, 1.0, 25.0, 3.3, 1.0, 10.24, 0.16])]
    with torch.no_grad():
        batch = expert(clips)
        for i, c in enumerate(clips):
            alone = expert([c])
            n = num_steps(len(c))
            for hb, ha in zip(batch["hidden_states"] + [batch["last_hidden_state"]],
                              alone["hidden_states"] + [alone["last_hidden_state"]]):
                assert ha.shape[1] == n
                assert (hb[i, :n] - ha[0]).abs().max().item() <= 1e-5


def test_features_are_the_encoders_on_the_pretraining_fbank(expert, ckpts):
    """The upstream reuses wav_to_fbank / normalize_fbank / AudioEncoder.extract_features:
    a 25 s clip is three windows (1024, 1024, 464 frames), each encoded on its own."""
    encoder = ckpts[2]
    mean, std = NORM_STATS["speech_commands"]
    x = wav(25.0, 7)
    fb = normalize_fbank(wav_to_fbank(x, 16 * 157), mean, std)
    with torch.no_grad():
        out = expert([x])
        ref = []
        for start in (0, 1024, 2048):
            feats = encoder.extract_features(fb[start:start + 1024][None, None])
            layers = feats["layer_results"] + [feats["x"]]
            ref.append([h[:, 1:].reshape(1, -1, 8, DIM).mean(2) for h in layers])
    got = out["hidden_states"] + [out["last_hidden_state"]]
    for layer, h in enumerate(got):
        want = torch.cat([r[layer] for r in ref], dim=1)
        assert want.shape == h.shape == (1, 157, DIM)
        assert torch.allclose(h, want, atol=1e-5)


def test_options_and_errors(ckpts, tmp_path):
    cfg = tmp_path / "opts.yaml"
    cfg.write_text("freq_pool: concat\nwindow_frames: 256\n")
    up = UpstreamExpert(ckpts[1], model_config=str(cfg), refresh=False).eval()  # refresh: S3PRLUpstream's kwarg
    assert up.freq_pool == "concat" and up.window_frames == 256 and up.hidden_size == 8 * DIM
    with torch.no_grad():
        assert up([wav(5.0)])["hidden_states"][0].shape == (1, num_steps(5 * SR), 8 * DIM)
    with pytest.raises(ValueError, match="freq_pool"):
        UpstreamExpert(ckpts[1], freq_pool="max")
    with pytest.raises(ValueError, match="window_frames"):
        UpstreamExpert(ckpts[1], window_frames=2048)
    with pytest.raises(ValueError, match="empty"):
        UpstreamExpert(ckpts[1])([torch.zeros(0)])
    from upstream.hubconf import supmam_clap_local

    for missing in (str(tmp_path / "missing.pt"), tmp_path / "missing.pt", None):
        with pytest.raises(FileNotFoundError, match="supmam_clap_local: checkpoint not found"):
            supmam_clap_local(missing)
    with pytest.raises(CheckpointError, match="config.json: not found; a folder is read as a Hugging Face folder"):
        supmam_clap_local(str(tmp_path))  # a folder is read as a Hugging Face folder (tests/test_hub.py)
    with pytest.raises(CheckpointError):
        (tmp_path / "junk.pt").write_bytes(b"junk")
        supmam_clap_local(str(tmp_path / "junk.pt"))


# ---------------------------------------------------------------------------- s3prl's contract


@pytest.fixture(scope="module")
def s3prl_hub():
    from upstream.hubconf import register

    assert register() == ["supmam_clap_local"]
    from s3prl import hub

    return hub


def _pseudo(seed, **kw):
    from s3prl.util.pseudo_data import get_pseudo_wavs

    return get_pseudo_wavs(seed=seed, padded=True, **kw)


def test_s3prl_upstream_forward_backward(s3prl_hub, ckpts):
    """s3prl's test/test_upstream.py::_test_forward_backward and its length contract,
    through s3prl.nn.S3PRLUpstream (which pads wavs shorter than 0.05 s and checks
    ``len(range(0, max_len, stride))``)."""
    from s3prl.nn import Featurizer, S3PRLUpstream

    for path in ckpts[:2]:
        model = S3PRLUpstream("supmam_clap_local", path_or_url=path)
        assert model.num_layers == DEPTH + 1 and model.hidden_sizes == [DIM] * (DEPTH + 1)
        assert model.downsample_rates == [2560] * (DEPTH + 1)
        for kw in (dict(min_secs=0.05, max_secs=0.05, n=1), dict(min_secs=0.05, max_secs=0.05, n=2),
                   dict(min_secs=0.05, max_secs=1, n=3)):
            with torch.autograd.set_detect_anomaly(True):
                wavs, wavs_len = _pseudo(0, **kw)
                all_hs, all_lens = model(wavs, wavs_len)
                total = sum(h.sum() for h in all_hs)
                total.backward()
            for h, lens in zip(all_hs, all_lens):
                assert h.shape[1] == max(len(range(0, int(n), 2560)) for n in wavs_len)
                assert lens.tolist() == [len(range(0, int(n), 2560)) for n in wavs_len]
        featurizer = Featurizer(model)
        wavs, wavs_len = _pseudo(3)
        hs, hs_len = featurizer(*model(wavs, wavs_len))
        assert hs.shape == (2, int(hs_len.max()), DIM) and featurizer.downsample_rate == 2560
        hs.sum().backward()
        assert featurizer.weights.grad is not None


def test_s3prl_deterministic_in_eval_and_fixed_layers_in_train(s3prl_hub, ckpts):
    """test_upstream.py::_compare_with_extracted, minus the reference features."""
    from s3prl.nn import S3PRLUpstream

    model = S3PRLUpstream("supmam_clap_local", path_or_url=ckpts[1])
    model.eval()
    with torch.no_grad():
        hs = model(*_pseudo(0))[0]
        again = model(*_pseudo(0))[0]
        assert all(torch.equal(a, b) for a, b in zip(hs, again))
        assert len(model(*_pseudo(1))[0]) == len(hs)
    model.train()
    assert len(model(*_pseudo(2))[0]) == len(hs)


def test_legacy_featurizer(s3prl_hub, ckpts):
    """s3prl.upstream.interfaces.Featurizer as s3prl's downstream runner uses it."""
    from s3prl.upstream.interfaces import Featurizer, UpstreamBase

    upstream = s3prl_hub.supmam_clap_local(ckpts[0])
    assert isinstance(upstream, UpstreamBase)
    for selection, layers in (("hidden_states", DEPTH + 1), ("last_hidden_state", None)):
        featurizer = Featurizer(upstream, feature_selection=selection, upstream_device="cpu")
        assert featurizer.output_dim == DIM and featurizer.downsample_rate == 2560
        assert getattr(featurizer, "layer_num", None) == layers
        wavs = [wav(1.0, 1), wav(2.5, 2), wav(0.7, 3)]
        feats = featurizer(wavs, upstream(wavs))
        assert [f.shape for f in feats] == [(round(len(w) / 2560), DIM) for w in wavs]
        sum(f.sum() for f in feats).backward()


# ---------------------------------------------------------------------------- benchmark smoke run


@pytest.mark.slow  # a benchmark smoke run (its machine report runs `uname -p`)
def test_bench_upstream_quick(tmp_path, capsys):
    """benchmarks/bench_upstream.py --quick, in this process (its main(argv))."""
    import runpy

    out = tmp_path / "upstream.json"
    main = runpy.run_path(str(REPO / "benchmarks" / "bench_upstream.py"))["main"]
    returned = main(["--quick", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert "audio s/s" in capsys.readouterr().out  # the table was printed
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["config"]["name"] == "quick" and report["config"]["depth"] == 2
    assert set(report["cases"]) == {"1s_b4", "10s_b2"}
    for case in report["cases"].values():
        assert math.isfinite(case["audio_seconds_per_second"]) and case["audio_seconds_per_second"] > 0
        assert case["num_hidden_states"] == 3
        assert case["output_shape"] == [case["batch_size"], num_steps(int(case["clip_seconds"] * SR)), 32]
    assert report["machine"]["torch_threads"] == 1
