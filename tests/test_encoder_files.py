"""Standalone encoder files: the safetensors export and ``mam_clap_plugin.load_encoder`` on every layout.

The export holds the weights and a JSON config; the torch-only loader reads every kind of file
(an export of either version, a pretraining checkpoint, a fine-tuning checkpoint, a converted
AudioMAE file), also with fairseq unimportable."""
import errno
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mam_clap_plugin
from mam_clap_plugin.checkpoint import (
    CONFIG_KEY,
    EXPORT_VERSION,
    CheckpointError,
    export_encoder,
    sidecar_path,
)
from mam_clap_plugin.data.audio import FBANK_OPTIONS, NORM_STATS
from mam_clap_plugin.files import file_sha256
from mam_clap_plugin.modules.encoder import AudioEncoder

from .audiomae import audiomae_encoder
from .helpers import blocking_imports

REPO = Path(__file__).resolve().parents[1]
MODEL_CFG = {"_name": "supmam_clap", "encoder_embed_dim": 32, "encoder_layers": 2, "encoder_attention_heads": 4,
             "mlp_ratio": 4.0, "max_frames": 256, "decoder_embed_dim": 16}
ENCODER_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0, "max_frames": 256}


def _random_encoder(seed=0):
    torch.manual_seed(seed)
    encoder = AudioEncoder(**ENCODER_KWARGS).eval()
    with torch.no_grad():
        encoder.norm.weight.normal_(1.0, 0.1)
    return encoder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny encoder in each layout the loader reads."""
    root = tmp_path_factory.mktemp("encfiles")
    encoder = _random_encoder()
    enc_sd = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    pretraining = {"args": None, "cfg": {"model": dict(MODEL_CFG),
                                         "task": {"_name": "mam_clap_pretraining", "target_length": 128,
                                                  "norm_stats": "speech_commands"}},
                   "model": {**enc_sd, "decoder.embed.weight": torch.zeros(16, 32)},
                   "optimizer_history": [{"num_updates": 3}], "extra_state": {}, "last_optimizer_state": None}
    torch.save(pretraining, root / "checkpoint_last.pt")
    # the fine-tuning model mam_clap_classifier: the encoder under "encoder.", its own head
    finetuning = {"args": None,
                  "cfg": {"model": {"_name": "mam_clap_classifier", "model_path": "checkpoint_last.pt",
                                    "encoder_attention_heads": 4, "num_classes": 3, "drop_path": 0.1},
                          "task": {"_name": "mam_clap_finetuning", "target_length": 96, "norm_stats": "esc50"}},
                  "model": {**enc_sd, "fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32),
                            "head.weight": torch.zeros(3, 32), "head.bias": torch.zeros(3)},
                  "optimizer_history": [{"num_updates": 5}], "extra_state": {}, "last_optimizer_state": None}
    torch.save(finetuning, root / "checkpoint_best.pt")
    export_encoder(str(root / "checkpoint_last.pt"), str(root / "encoder.safetensors"))
    export_encoder(str(root / "checkpoint_last.pt"), str(root / "encoder.pt"))
    return {"root": root, "encoder": encoder, "pretraining": str(root / "checkpoint_last.pt"),
            "finetuning": str(root / "checkpoint_best.pt"), "export": str(root / "encoder.safetensors"),
            "legacy": str(root / "encoder.pt")}


def test_safetensors_export_holds_weights_and_config(files):
    tensors = load_file(files["export"])
    assert set(tensors) == set(files["encoder"].state_dict())
    for k, v in files["encoder"].state_dict().items():
        assert torch.equal(tensors[k], v), k
    side = json.loads(Path(sidecar_path(files["export"])).read_text())
    from safetensors import safe_open

    with safe_open(files["export"], framework="pt") as f:
        embedded = json.loads(f.metadata()[CONFIG_KEY])
    assert side == embedded
    assert side["format"] == "mam_clap_encoder" and side["version"] == EXPORT_VERSION == 2
    assert side["encoder"] == {**ENCODER_KWARGS, "num_mel_bins": 128, "final_norm": True}
    mean, std = NORM_STATS["speech_commands"]
    assert side["frontend"] == {"sample_rate": 16000, "fbank": "torchaudio.compliance.kaldi.fbank",
                                "fbank_options": FBANK_OPTIONS, "waveform_mean_removed": True, "target_length": 128,
                                "norm_stats": {"mean": mean, "std": std, "spec": "speech_commands"},
                                "normalisation": "(fbank - mean) / (2 * std)"}
    assert side["source"] == {"file": "checkpoint_last.pt", "sha256": file_sha256(files["pretraining"]),
                              "kind": "fairseq:supmam_clap", "variant": "MAM"}  # target pixel, no branch
    assert side["head"] is None


@pytest.mark.parametrize("kind", ["export", "legacy", "pretraining", "finetuning"])
def test_load_encoder_reads_every_layout(files, kind):
    bundle = mam_clap_plugin.load_encoder_with_stats(files[kind])
    assert isinstance(bundle, mam_clap_plugin.EncoderBundle) and not bundle.encoder.training
    for k, v in files["encoder"].state_dict().items():
        assert torch.equal(bundle.encoder.state_dict()[k], v), k
    stats = "esc50" if kind == "finetuning" else "speech_commands"
    assert (bundle.norm_mean, bundle.norm_std) == NORM_STATS[stats]
    assert bundle.target_length == (96 if kind == "finetuning" else 128)
    encoder = mam_clap_plugin.load_encoder(files[kind])
    x = torch.randn(1, 1, 64, 128)
    with torch.no_grad():
        assert torch.equal(encoder.extract_features(x)["x"], files["encoder"].extract_features(x)["x"])


def test_export_of_a_finetuning_checkpoint_and_of_an_export(files, tmp_path):
    meta = export_encoder(files["finetuning"], str(tmp_path / "ft.safetensors"))
    assert meta["source"]["kind"] == "fairseq:mam_clap_classifier" and meta["source"]["variant"] is None
    assert meta["frontend"]["norm_stats"]["spec"] == "esc50" and meta["frontend"]["target_length"] == 96
    again = export_encoder(files["export"], str(tmp_path / "again.safetensors"))
    assert again["source"] == {"file": "encoder.safetensors", "sha256": file_sha256(files["export"]),
                               "kind": "mam_clap_encoder", "variant": "MAM"}  # carried from the first export
    assert again["encoder"] == json.loads(Path(sidecar_path(files["export"])).read_text())["encoder"]
    assert again["frontend"]["norm_stats"]["spec"] == "speech_commands"


def test_clear_errors(files, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="plain.safetensors: a safetensors file without a 'mam_clap_config'"):
        mam_clap_plugin.load_encoder(str(plain))
    tensors = load_file(files["export"])
    config = json.loads(Path(sidecar_path(files["export"])).read_text())
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={CONFIG_KEY: json.dumps({**config, "version": 9})})
    with pytest.raises(CheckpointError, match="v9.safetensors: encoder export version 9"):
        mam_clap_plugin.load_encoder_with_stats(str(tmp_path / "v9.safetensors"))
    other = dict(config, frontend={**config["frontend"], "fbank_options": {**FBANK_OPTIONS, "num_mel_bins": 80}})
    save_file(tensors, str(tmp_path / "mel80.safetensors"), metadata={CONFIG_KEY: json.dumps(other)})
    with pytest.raises(CheckpointError, match="mel80.safetensors: the encoder expects another front end"):
        mam_clap_plugin.load_encoder_with_stats(str(tmp_path / "mel80.safetensors"))
    del tensors["blocks.1.mlp.fc2.bias"]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata={CONFIG_KEY: json.dumps(config)})
    with pytest.raises(CheckpointError, match=r"cut.safetensors: .*missing \['blocks.1.mlp.fc2.bias'\]"):
        mam_clap_plugin.load_encoder(str(tmp_path / "cut.safetensors"))
    ft = torch.load(files["finetuning"], weights_only=True)
    del ft["cfg"]["model"]["encoder_attention_heads"]
    torch.save(ft, tmp_path / "noheads.pt")
    with pytest.raises(CheckpointError, match="noheads.pt: fine-tuning config has no model.encoder_attention_heads"):
        mam_clap_plugin.load_encoder(str(tmp_path / "noheads.pt"))


@pytest.mark.slow
def test_cli_and_every_loader_without_fairseq(files, tmp_path):
    """In a process where importing fairseq raises: the export CLI writes a safetensors file
    and mam_clap_plugin.load_encoder reads every layout (also a converted AudioMAE file)."""
    save_file(audiomae_encoder(32, 2), str(tmp_path / "timm.safetensors"))
    from mam_clap_plugin.convert import convert_audiomae

    convert_audiomae(str(tmp_path / "timm.safetensors"), str(tmp_path / "audiomae.safetensors"), num_heads=4)
    out = tmp_path / "cli.safetensors"
    paths = [files["export"], files["legacy"], files["pretraining"], files["finetuning"],
             str(tmp_path / "audiomae.safetensors"), str(out)]
    code = (
        blocking_imports("fairseq", "s3prl")
        + "import runpy\n"
        f"sys.argv = ['export_encoder.py', {files['pretraining']!r}, {str(out)!r}]\n"
        "try:\n"
        "    runpy.run_path('examples/export_encoder.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "import torch\n"
        "from mam_clap_plugin import load_encoder\n"
        f"for p in {paths!r}:\n"
        "    enc = load_encoder(p)\n"
        "    print('layers', len(enc.extract_features(torch.zeros(1, 1, 32, 128))['layer_results']))\n"
        "assert 'fairseq' not in sys.modules and 's3prl' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("layers 3") == len(paths)
    assert '"kind": "fairseq:supmam_clap"' in proc.stdout and out.is_file()


def test_export_cli_errors(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "examples" / "export_encoder.py"))["main"]
    assert main([str(tmp_path / "no.pt"), str(tmp_path / "x.safetensors")]) == 1
    assert "no.pt: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("target,branch,variant", [("pixel", False, "MAM"), ("clap", False, "MAM-CLAP"),
                                                   ("pixel", True, "SupMAM"), ("clap", True, "SupMAM-CLAP")])
def test_pretraining_variant_from_the_model_config(target, branch, variant):
    from mam_clap_plugin.checkpoint import pretraining_variant

    state = {"cfg": {"model": {**MODEL_CFG, "target": target, "classification_branch": branch}}, "model": {}}
    assert pretraining_variant(state) == variant



def _writers(encoder):
    """(file name, write) of each export write: the safetensors export (+ its JSON), the torch export,
    and write_text (the JSON next to an export, a Hugging Face folder's config.json)."""
    from mam_clap_plugin.checkpoint import save_encoder, write_text

    def export(path):
        save_encoder(str(path), encoder, ENCODER_KWARGS, 0.0, 1.0, "0,1", 256, "test")

    return {"safetensors": ("enc.safetensors", export), "pt": ("enc.pt", export),
            "text": ("config.json", lambda path: write_text(str(path), "x" * 100_000))}


def _assert_not_written(err, path, reason, previous=None):
    """The OSError of a failed atomic write: names the file, says why and what is left; no temporary file."""
    kept = "the previous file is unchanged" if previous is not None else "nothing was written"
    message = err.strerror
    assert message.startswith(f"{path}: ") and " not written: " in message and reason in message
    assert f"bytes free in {path.parent})" in message and message.endswith(kept)
    assert not [n for n in os.listdir(path.parent) if ".tmp" in n]
    assert (path.read_bytes() == previous) if previous is not None else not path.exists()


@pytest.mark.parametrize("kind", ["safetensors", "pt", "text"])
@pytest.mark.parametrize("previous", [None, b"the previous file"])
def test_a_full_disk_while_exporting_leaves_no_temporary_file(tmp_path, monkeypatch, kind, previous):
    """A full disk (ENOSPC) after a few bytes of the safetensors export, the torch export or write_text:
    an OSError naming the file; the previous file (if any) unchanged; no temporary file beside it."""
    import builtins

    import safetensors.torch

    name, write = _writers(_random_encoder())[kind]
    path = tmp_path / name
    if previous is not None:
        path.write_bytes(previous)

    def full_disk(_obj, f, *args, **kwargs):  # save_file(tensors, filename) / torch.save(obj, file)
        if isinstance(f, str):
            with open(f, "wb") as out:
                out.write(b"partial")
        else:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    class FullFile:  # write_text's file: a few bytes, then a full disk
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.f.close()

        def write(self, text):
            self.f.write(text[:10])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(mam_clap_plugin.checkpoint, "open",
                        lambda *a, **k: FullFile(builtins.open(*a, **k)), raising=False)
    with pytest.raises(OSError) as err:
        write(path)
    assert err.value.errno == errno.ENOSPC
    _assert_not_written(err.value, path, "No space left on device", previous)
    assert not (tmp_path / "enc.json").exists()  # the safetensors export's JSON follows the weights


@pytest.mark.parametrize("kind", ["safetensors", "pt", "text"])
def test_a_file_size_limit_while_exporting(tmp_path, kind):
    """The real failures under a file size limit (EFBIG, as a full disk gives ENOSPC): safetensors'
    SafetensorError ("os error 27"), torch.save's RuntimeError and a text write all become an OSError
    naming the file, and no temporary file stays."""
    import resource

    name, write = _writers(_random_encoder())[kind]
    path = tmp_path / name
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(OSError) as err:
            write(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG
    _assert_not_written(err.value, path, "File too large")
