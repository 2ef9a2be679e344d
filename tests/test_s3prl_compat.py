"""The s3prl compatibility shims (upstream/compat): each one is needed, scoped and reversible.

Each shim's error happens without it (checked in a fresh subprocess, where the environment lacks
the piece) and the behaviour with it (in this process, for this module only: the shims are
installed with ``compat.shims_installed()`` and the process state they touch is checked to be
restored afterwards)."""
import argparse
import fractions
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from upstream import compat

REPO = Path(__file__).resolve().parents[1]

# Each probe runs in a process without the shims; it prints "Type: message" or "OK".
PROBES = {
    "tensorboardx": "import s3prl.downstream.runner",
    "set_audio_backend": "import torchaudio; torchaudio.set_audio_backend('sox_io')",
    "s3prl_hub": "import s3prl.hub",
    "sox_effects": "from torchaudio.sox_effects import apply_effects_file",
    "load": "import torchaudio; torchaudio.load(WAV)",
    "save": "import torchaudio, torch; torchaudio.save(WAV + '.out.wav', torch.zeros(1, 10), 16000)",
    "info": "import torchaudio; torchaudio.info(WAV)",
    "hf_folder": "from huggingface_hub import HfFolder",
    "hf_repository": "from huggingface_hub import Repository",
    "catalyst": "from catalyst.data.sampler import DistributedSamplerWrapper",
    "torch_load_namespace": "import torch; torch.load(NS_CKPT)",
}

PROBE_SCRIPT = r"""
import json, sys, traceback
WAV, NS_CKPT, probes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import argparse, importlib.util, numpy, soundfile, torch, torchaudio, huggingface_hub
spec = lambda name: importlib.util.find_spec(name) is not None
env = {  # what this environment lacks, before any shim
    'set_audio_backend': hasattr(torchaudio, 'set_audio_backend'), 'info': hasattr(torchaudio, 'info'),
    'sox_effects': spec('torchaudio.sox_effects'), 'torchcodec': spec('torchcodec'),
    'HfFolder': hasattr(huggingface_hub, 'HfFolder'), 'Repository': hasattr(huggingface_hub, 'Repository'),
    'tensorboardX': spec('tensorboardX'), 'catalyst': spec('catalyst'),
}
soundfile.write(WAV, numpy.zeros(1600, dtype='float32'), 16000)
torch.save({'Args': argparse.Namespace(mode='train'), 'Step': 3}, NS_CKPT)
out = {}
for name, code in probes.items():
    try:
        exec(code, {'WAV': WAV, 'NS_CKPT': NS_CKPT})
        out[name] = 'OK'
    except BaseException as e:
        out[name] = f'{type(e).__name__}: {e}'
print('PROBES ' + json.dumps({'env': env, 'errors': out}))
"""


def _process_state() -> dict:
    """Everything the shims change: torchaudio's and huggingface_hub's attributes, the modules
    they add (and s3prl's, which are built on them), Namespace on torch's weights-only allow-list."""
    import huggingface_hub
    import torchaudio

    return {
        "torchaudio": {n: vars(torchaudio).get(n) for n in ("set_audio_backend", "get_audio_backend",
                                                            "list_audio_backends", "load", "save", "info",
                                                            "sox_effects")},
        "huggingface_hub": {n: vars(huggingface_hub).get(n) for n in ("HfFolder", "Repository")},
        "modules": sorted(n for n in sys.modules
                          if n == "torchaudio.sox_effects" or n.split(".")[0] in ("tensorboardX", "catalyst", "s3prl")),
        # (torch's own modules imported meanwhile may add their classes to the allow-list)
        "namespace_allowed": argparse.Namespace in torch.serialization.get_safe_globals(),
        "installed": compat.installed_shims(),
    }


@pytest.fixture(scope="module")
def unshimmed(tmp_path_factory):
    """What a fresh process without the shims has (``env``) and the errors each probe raises."""
    tmp = tmp_path_factory.mktemp("probe")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE_SCRIPT, str(tmp / "x.wav"), str(tmp / "ns.ckpt"), json.dumps(PROBES)],
        cwd=tmp, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBES ")][-1]
    return json.loads(line[len("PROBES "):])


@pytest.fixture(scope="module")
def shims():
    """The shims for this module's tests only; afterwards the process is as it was."""
    before = _process_state()
    with compat.shims_installed():
        yield compat
    assert _process_state() == before, "the shims leaked out of tests/test_s3prl_compat.py"


def _needs(condition: bool, why: str):
    if not condition:
        pytest.skip(why)


# ---------------------------------------------------------------------------- without the shims


@pytest.mark.slow
def test_errors_without_shims(unshimmed):
    """The exact errors the module docstring quotes, where this environment lacks the piece
    (decided in the fresh process: this one may already have the shims)."""
    env, err = unshimmed["env"], unshimmed["errors"]
    if not env["set_audio_backend"]:
        msg = "AttributeError: module 'torchaudio' has no attribute 'set_audio_backend'"
        assert err["set_audio_backend"] == msg
        assert err["s3prl_hub"] == msg  # byol_s calls it at import time
    if not env["sox_effects"]:
        assert err["sox_effects"] == "ModuleNotFoundError: No module named 'torchaudio.sox_effects'"
    if not env["torchcodec"]:
        for name in ("load", "save"):
            assert err[name] == (f"ImportError: TorchCodec is required for {name}_with_torchcodec. "
                                 "Please install torchcodec to use this function.")
    if not env["info"]:
        assert err["info"] == "AttributeError: module 'torchaudio' has no attribute 'info'"
    for name, probe in (("HfFolder", "hf_folder"), ("Repository", "hf_repository")):
        if not env[name]:
            assert err[probe].startswith(f"ImportError: cannot import name '{name}' from 'huggingface_hub'")
    if not env["tensorboardX"]:
        assert err["tensorboardx"] == "ModuleNotFoundError: No module named 'tensorboardX'"
    if not env["catalyst"]:
        assert err["catalyst"] == "ModuleNotFoundError: No module named 'catalyst'"
    ns = err["torch_load_namespace"]
    assert ns.startswith("UnpicklingError: Weights only load failed") and "argparse.Namespace" in ns, ns


@pytest.mark.slow
def test_this_environment_needs_every_shim(unshimmed):
    """The pinned set (torchaudio 2.11, huggingface_hub 2.x, no tensorboardX/catalyst/torchcodec)
    lacks every piece; if a pin changes, the matching shim becomes a no-op (see install_shims)."""
    assert not any(unshimmed["env"].values()), unshimmed["env"]


def test_docstring_table_names_every_shim():
    doc = compat.__doc__
    for fn in compat.SHIMS.values():
        assert f"``{fn.__name__}``" in doc, fn.__name__
        assert fn.__doc__ and ("Error" in fn.__doc__ or "error" in fn.__doc__), fn.__name__
    # one module per shim
    modules = [fn.__module__ for fn in compat.SHIMS.values()]
    assert len(set(modules)) == len(modules) and all(m.startswith("upstream.compat.") for m in modules)


# ---------------------------------------------------------------------------- scoped installation


def test_shims_are_scoped_and_reversible():
    """``shims_installed()`` undoes what it did, s3prl imported inside included, and can be
    entered again; ``uninstall_shims()`` undoes ``install_shims()``."""
    import torchaudio

    before = _process_state()
    for _ in range(2):  # a second round re-installs and re-imports s3prl
        with compat.shims_installed() as names:
            assert names == ([] if before["installed"] else list(compat.SHIMS))
            import s3prl.downstream.runner  # noqa: F401

            assert torchaudio.load is compat.soundfile_load and "tensorboardX" in sys.modules
            assert argparse.Namespace in torch.serialization.get_safe_globals()
        assert _process_state() == before
    assert "s3prl.downstream.runner" not in sys.modules
    if not before["installed"]:
        compat.install_shims()
        assert _process_state() != before
        compat.uninstall_shims()
        assert _process_state() == before and compat.installed_shims() == []


# ---------------------------------------------------------------------------- with the shims


def test_install_is_idempotent(shims):
    import torchaudio

    load, sox = torchaudio.load, sys.modules.get("torchaudio.sox_effects")
    assert shims.install_shims() == []
    assert torchaudio.load is load and sys.modules.get("torchaudio.sox_effects") is sox
    assert shims.installed_shims() == list(shims.SHIMS)


def test_s3prl_modules_import(shims):
    import importlib

    for name in ("s3prl.hub", "s3prl.nn", "s3prl.upstream.interfaces", "s3prl.downstream.runner",
                 "s3prl.downstream.speech_commands.expert", "s3prl.run_downstream"):
        importlib.import_module(name)


def test_set_audio_backend(shims):
    import torchaudio

    assert torchaudio.set_audio_backend("sox_io") is None
    assert torchaudio.set_audio_backend(None) is None
    if getattr(torchaudio.set_audio_backend, compat.MARK, False):
        assert torchaudio.get_audio_backend() == "soundfile"


@pytest.fixture
def stereo_wav(tmp_path):
    rng = np.random.default_rng(0)
    data = (0.3 * rng.standard_normal((4000, 2))).clip(-1, 1).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, data, 8000, subtype="PCM_16")
    return path, sf.read(path, dtype="float32")[0]


def test_load_save_info(shims, stereo_wav, tmp_path):
    import torchaudio

    path, data = stereo_wav
    wav, rate = torchaudio.load(str(path))
    assert rate == 8000 and wav.dtype == torch.float32 and wav.shape == (2, 4000)
    assert torch.equal(wav, torch.from_numpy(data).t())
    part, _ = torchaudio.load(path, frame_offset=100, num_frames=50)  # PathLike too
    assert torch.equal(part, wav[:, 100:150])
    assert torchaudio.load(str(path), channels_first=False)[0].shape == (4000, 2)
    ints, _ = torchaudio.load(str(path), normalize=False)
    assert ints.dtype == torch.int16 and torch.equal(ints.float() / 32768, wav)
    info = torchaudio.info(str(path))
    assert (info.sample_rate, info.num_frames, info.num_channels, info.bits_per_sample, info.encoding) == \
        (8000, 4000, 2, 16, "PCM_S")
    out = tmp_path / "saved.wav"
    torchaudio.save(str(out), wav, 8000)
    again, r = torchaudio.load(str(out))
    assert r == 8000 and torch.equal(again, wav)  # 16-bit PCM default, lossless for 16-bit input
    torchaudio.save(str(tmp_path / "mono.flac"), wav[0], 8000)
    assert torchaudio.info(str(tmp_path / "mono.flac")).num_channels == 1


def test_sox_effects_speech_commands_chain(shims, stereo_wav):
    import torchaudio
    from torchaudio.sox_effects import apply_effects_file, apply_effects_tensor

    path, data = stereo_wav
    effects = [["channels", "1"], ["rate", "16000"], ["gain", "-3.0"]]  # s3prl speech_commands/dataset.py
    wav, rate = apply_effects_file(str(path), effects)
    mono = torch.from_numpy(data).mean(dim=1, keepdim=True).t()
    want = torchaudio.functional.resample(mono, 8000, 16000) * 10 ** (-3 / 20)
    assert rate == 16000 and wav.shape == (1, 8000) and torch.allclose(wav, want, atol=1e-6)
    x = torch.tensor([[0.5, -0.25, 0.0, 0.1]])
    assert torch.allclose(apply_effects_tensor(x, 16000, [["norm"]])[0], x * 2)
    assert torch.allclose(apply_effects_tensor(x, 16000, [["gain", "-n", "-6"]])[0], x * 2 * 10 ** (-6 / 20))
    assert torch.equal(apply_effects_tensor(x, 16000, [["reverse"]])[0], x.flip(1))
    assert torch.equal(apply_effects_tensor(x, 1, [["pad", "1", "2"]])[0], torch.tensor([[0, .5, -.25, 0, .1, 0, 0]]))
    assert torch.equal(apply_effects_tensor(x, 1, [["trim", "1", "2"]])[0], x[:, 1:3])
    assert torch.equal(apply_effects_tensor(x, 16000, [["trim", "2s"]])[0], x[:, 2:])
    with pytest.raises(NotImplementedError, match="vad"):
        apply_effects_tensor(x, 16000, [["vad", "-T", "0.25"]])


def test_huggingface_hub(shims, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import HfFolder, Repository

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert HfFolder.get_token() == huggingface_hub.get_token() == "hf_test_token"
    if getattr(Repository, compat.MARK, False):
        with pytest.raises(RuntimeError, match="Repository was removed"):
            Repository("/tmp/x", clone_from="user/model")


def test_tensorboardx_summary_writer(shims, tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs"))
    writer.add_scalar("speech_commands/dev-acc", torch.tensor(0.5), global_step=10)
    writer.add_scalars("x", {"a": 1, "b": float("nan")}, 11)
    writer.add_text("note", "ignored", 1)
    writer.add_histogram("h", torch.randn(5), 1)
    writer.flush()
    writer.close()
    if isinstance(writer, compat.JsonlSummaryWriter):
        lines = [json.loads(ln) for ln in (tmp_path / "logs" / "scalars.jsonl").read_text().splitlines()]
        assert lines == [{"tag": "speech_commands/dev-acc", "value": 0.5, "step": 10},
                         {"tag": "x/a", "value": 1.0, "step": 11}, {"tag": "x/b", "value": "nan", "step": 11}]


def test_catalyst_distributed_sampler_wrapper(shims):
    from catalyst.data.sampler import DistributedSamplerWrapper
    from torch.utils.data import WeightedRandomSampler

    base = list(range(10, 20))  # any sampler: iterable of indices with a length
    parts = [list(DistributedSamplerWrapper(base, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(p) for p in parts] == [5, 5] and sorted(parts[0] + parts[1]) == list(range(10, 20))
    wrapper = DistributedSamplerWrapper(WeightedRandomSampler([1.0] * 7, 7), num_replicas=3, rank=2)
    assert len(wrapper) == math.ceil(7 / 3) == len(list(wrapper))
    assert all(0 <= i < 7 for i in wrapper)
    wrapper.set_epoch(1)


def test_torch_load_namespace_only(shims, tmp_path):
    path = tmp_path / "dev-best.ckpt"
    torch.save({"Args": argparse.Namespace(mode="train", expdir="x"), "Config": {"runner": {}}, "Step": 5}, path)
    state = torch.load(path, map_location="cpu")  # s3prl's call: default weights_only=True
    assert state["Args"].mode == "train" and state["Step"] == 5
    torch.save({"x": fractions.Fraction(1, 3)}, tmp_path / "other.pt")
    with pytest.raises(pickle.UnpicklingError, match="Fraction"):
        torch.load(tmp_path / "other.pt")  # the allow-list is not opened further
