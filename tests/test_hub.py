"""The Hugging Face layout (mam_clap_plugin.hub, export_encoder.py --hub) round-trips and is refused when broken.

The Hugging Face layout: mam_clap_plugin.hub.MamClapEncoder and `examples/export_encoder.py
CKPT OUT --hub`. A round trip export -> Hugging Face folder -> from_pretrained with equal
outputs, the folder's files (config.json = the export's JSON, model.safetensors, the model card
and its three-line example), every loader reading the folder (load_encoder, the s3prl upstream's
-k, extract_features.py, hear.load_model), loading with fairseq blocked and no network, and
corrupted or mismatched folders refused with an error naming the file."""
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mam_clap_plugin
from mam_clap_plugin import hear
from mam_clap_plugin.checkpoint import CONFIG_KEY, CheckpointError, export_encoder, save_encoder, sidecar_path
from mam_clap_plugin.data.audio import FBANK_OPTIONS, NORM_STATS
from mam_clap_plugin.files import file_sha256
from mam_clap_plugin.hub import MamClapEncoder, export_hub_folder
from mam_clap_plugin.modules.encoder import AudioEncoder

from .conftest import PRETRAINED_DEPTH, PRETRAINED_DIM
from .helpers import blocking_imports

REPO = Path(__file__).resolve().parents[1]
MODEL_CFG = {"_name": "supmam_clap", "encoder_embed_dim": 32, "encoder_layers": 2, "encoder_attention_heads": 4,
             "mlp_ratio": 4.0, "max_frames": 256, "decoder_embed_dim": 16}
ENCODER_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0, "max_frames": 256}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny encoder saved as a fairseq-layout pretraining checkpoint, its export, and the
    Hugging Face folder written from that export."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    encoder = AudioEncoder(**ENCODER_KWARGS).eval()
    with torch.no_grad():
        encoder.norm.weight.normal_(1.0, 0.1)
    state = {"args": None, "cfg": {"model": dict(MODEL_CFG),
                                   "task": {"_name": "mam_clap_pretraining", "target_length": 128,
                                            "norm_stats": "speech_commands"}},
             "model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
             "optimizer_history": [{"num_updates": 3}], "extra_state": {}, "last_optimizer_state": None}
    torch.save(state, root / "checkpoint_last.pt")
    export_encoder(str(root / "checkpoint_last.pt"), str(root / "encoder.safetensors"))
    export_hub_folder(str(root / "encoder.safetensors"), str(root / "hub"))
    return {"root": root, "encoder": encoder, "pretraining": str(root / "checkpoint_last.pt"),
            "export": str(root / "encoder.safetensors"), "hub": str(root / "hub")}


def outputs(encoder, frames=64):
    x = torch.linspace(-2, 2, frames * 128).reshape(1, 1, frames, 128)
    with torch.no_grad():
        out = encoder.extract_features(x)
    return out["layer_results"] + [out["x"]]


def assert_same_outputs(a, b):
    for x, y in zip(outputs(a), outputs(b), strict=True):
        assert torch.equal(x, y)


def test_round_trip_export_hub_folder_from_pretrained(files, tmp_path):
    hub = Path(files["hub"])
    assert sorted(os.listdir(hub)) == ["README.md", "config.json", "model.safetensors"]
    model = MamClapEncoder.from_pretrained(files["hub"])
    assert isinstance(model, MamClapEncoder) and isinstance(model, AudioEncoder) and not model.training
    assert_same_outputs(model, files["encoder"])
    assert_same_outputs(model, mam_clap_plugin.load_encoder(files["export"]))
    assert (model.norm_mean, model.norm_std) == NORM_STATS["speech_commands"] and model.target_length == 128
    # config.json is the export's JSON config; only the source differs (the export is the source)
    config = json.loads((hub / "config.json").read_text())
    export = json.loads(Path(sidecar_path(files["export"])).read_text())
    assert {k: v for k, v in config.items() if k != "source"} == {k: v for k, v in export.items() if k != "source"}
    assert config["source"] == {"file": "encoder.safetensors", "sha256": file_sha256(files["export"]),
                                "kind": "mam_clap_encoder", "variant": "MAM"}
    assert config["encoder"] == {**ENCODER_KWARGS, "num_mel_bins": 128, "final_norm": True}
    assert config["frontend"]["fbank_options"] == FBANK_OPTIONS and config["frontend"]["target_length"] == 128
    # model.safetensors: the export's weights under the same names, the same config in its metadata
    assert {k: v.shape for k, v in load_file(str(hub / "model.safetensors")).items()} == \
        {k: v.shape for k, v in load_file(files["export"]).items()}
    with safe_open(str(hub / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[CONFIG_KEY]) == config and f.metadata()["format"] == "pt"
    # save_pretrained writes the same folder again; that folder loads to the same encoder
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_text() == (hub / "config.json").read_text()
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in load_file(str(hub / "model.safetensors")).items())
    assert_same_outputs(MamClapEncoder.from_pretrained(tmp_path / "again"), files["encoder"])
    # the model's features: exactly what extract_features computes per file
    wav = torch.linspace(-0.5, 0.5, 30000).sin()
    with torch.no_grad():
        assert model.features(wav).shape == (32,)
        assert model.features(wav, "frame", "all").shape == (3, 12, 32)
        assert model.features(wav, "patch", 1).shape == (12, 8, 32)


def test_from_pretrained_reads_any_local_encoder_file(files):
    """A local export (read as it is) and a fairseq checkpoint (exported first) load too."""
    from_export = MamClapEncoder.from_pretrained(files["export"])
    assert from_export.export_config == json.loads(Path(sidecar_path(files["export"])).read_text())
    from_ckpt = MamClapEncoder.from_pretrained(files["pretraining"])
    assert from_ckpt.export_config["source"]["kind"] == "fairseq:supmam_clap"
    for model in (from_export, from_ckpt):
        assert_same_outputs(model, files["encoder"])


def test_model_card_and_its_three_line_example(files):
    card = (Path(files["hub"]) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mam-clap\n")
    config = json.loads((Path(files["hub"]) / "config.json").read_text())
    assert config["source"]["sha256"] in card and "encoder export (`mam_clap_encoder`)" in card
    assert "width 32, 2 blocks, 4 heads" in card and "Classifier head: none." in card
    assert "`torchaudio.compliance.kaldi.fbank` with " in card and "(fbank - mean) / (2 * std)" in card
    mean, std = NORM_STATS["speech_commands"]
    assert f"mean {mean}, std {std} (`speech_commands`)" in card
    (block,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    lines = block.strip().splitlines()
    assert len(lines) == 3
    code = block.replace("REPO_ID_OR_FOLDER", files["hub"])
    scope = {"wav": torch.zeros(20000)}
    exec(code, scope)  # the card's own example, run as written
    assert scope["clip"].shape == (32,)
    assert_same_outputs(scope["encoder"], files["encoder"])


def test_every_loader_reads_a_hub_folder(files, tmp_path):
    from upstream.expert import UpstreamExpert
    from upstream.hubconf import supmam_clap_local

    bundle = mam_clap_plugin.load_encoder_with_stats(files["hub"])
    assert (bundle.norm_mean, bundle.norm_std, bundle.target_length) == (*NORM_STATS["speech_commands"], 128)
    assert_same_outputs(bundle.encoder, files["encoder"])
    wavs = [torch.linspace(-0.3, 0.3, n).sin() for n in (16000, 5000)]
    with torch.no_grad():
        from_hub = supmam_clap_local(files["hub"]).eval()(wavs)
        from_export = UpstreamExpert(files["export"]).eval()(wavs)
    for a, b in zip(from_hub["hidden_states"] + [from_hub["last_hidden_state"]],
                    from_export["hidden_states"] + [from_export["last_hidden_state"]], strict=True):
        assert torch.equal(a, b)
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(str(audio / "a.wav"), np.sin(np.arange(24000) / 7.0).astype(np.float32) * 0.3, 16000)
    main = runpy.run_path(str(REPO / "examples" / "extract_features.py"))["main"]
    for name, ckpt in (("hub", files["hub"]), ("export", files["export"])):
        assert main([str(audio), "--checkpoint", ckpt, "--out", str(tmp_path / name), "--device", "cpu",
                     "--level", "frame"]) == 0
    assert np.array_equal(np.load(tmp_path / "hub" / "a.wav.npy"), np.load(tmp_path / "export" / "a.wav.npy"))
    settings = json.loads((tmp_path / "hub" / "features.json").read_text())
    assert settings["checkpoint_sha256"] == file_sha256(os.path.join(files["hub"], "model.safetensors"))
    model = hear.load_model(files["hub"])
    sound = torch.rand(2, 24000) * 2 - 1
    ref = hear.load_model(files["export"])
    assert torch.equal(hear.get_scene_embeddings(sound, model), hear.get_scene_embeddings(sound, ref))
    # an export of the folder names the folder's model.safetensors as its source
    meta = export_encoder(files["hub"], str(tmp_path / "from_hub.safetensors"))
    assert meta["source"] == {"file": "hub", "sha256": file_sha256(os.path.join(files["hub"], "model.safetensors")),
                              "kind": "mam_clap_encoder", "variant": "MAM"}


def test_loading_a_folder_needs_no_network(files, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading a local folder")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)
    assert_same_outputs(MamClapEncoder.from_pretrained(files["hub"]), files["encoder"])


def test_unknown_repo_id_offline_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="someone/no-such-encoder: not a local folder or file, and not loadable "
                                              "from the Hugging Face Hub"):
        MamClapEncoder.from_pretrained("someone/no-such-encoder", local_files_only=True, cache_dir=tmp_path)


def test_head_is_kept(tmp_path):
    """An export that keeps a classifier head (a converted fine-tuned AudioMAE file) keeps it in
    the folder; the fine-tuned scorer's loader reads it from there."""
    torch.manual_seed(1)
    encoder = AudioEncoder(**ENCODER_KWARGS, final_norm=False).eval()
    weights = {"fc_norm.weight": torch.rand(32), "fc_norm.bias": torch.rand(32), "head.weight": torch.rand(5, 32),
               "head.bias": torch.rand(5)}
    config = {**ENCODER_KWARGS, "final_norm": False}
    save_encoder(str(tmp_path / "ft.safetensors"), encoder, config, -4.27, 4.57, "audioset", 256, "ft.pth",
                 head={"config": {"num_classes": 5, "pooling": "mean"}, "weights": weights})
    export_hub_folder(str(tmp_path / "ft.safetensors"), str(tmp_path / "ft"))
    model = MamClapEncoder.from_pretrained(tmp_path / "ft")
    assert model.export_config["head"] == {"num_classes": 5, "pooling": "mean", "keys": sorted(weights)}
    assert torch.equal(model.head.weight, weights["head.weight"]) and torch.equal(model.fc_norm.bias,
                                                                                   weights["fc_norm.bias"])
    assert_same_outputs(model, encoder)
    assert "Classifier head: kept (5 classes, mean pooling" in (tmp_path / "ft" / "README.md").read_text()
    state = mam_clap_plugin.checkpoint.load_checkpoint(str(tmp_path / "ft"))
    assert mam_clap_plugin.checkpoint.head_keys(state) == sorted(weights)
    from mam_clap_plugin.data.manifest import write_class_list
    from mam_clap_plugin.inference import load_classifier, score_waveforms

    write_class_list(str(tmp_path / "classes.txt"), [f"class{i}" for i in range(5)])
    wavs = [torch.linspace(-0.3, 0.3, 12000).sin()]
    scores = score_waveforms(load_classifier(str(tmp_path / "ft"), str(tmp_path / "classes.txt")), wavs)
    ref = score_waveforms(load_classifier(str(tmp_path / "ft.safetensors"), str(tmp_path / "classes.txt")), wavs)
    assert scores.shape == (1, 5) and np.array_equal(scores, ref)


def _broken(files, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(files["hub"], folder)
    return folder


def test_corrupted_or_mismatched_folder_is_refused(files, tmp_path):
    config = json.loads((Path(files["hub"]) / "config.json").read_text())
    weights = load_file(os.path.join(files["hub"], "model.safetensors"))
    cases = []

    folder = _broken(files, tmp_path, "no_config")
    (folder / "config.json").unlink()
    cases.append((folder, r"no_config/config.json: not found; a folder is read as a Hugging Face folder"))

    folder = _broken(files, tmp_path, "no_weights")
    (folder / "model.safetensors").unlink()
    cases.append((folder, r"no_weights/model.safetensors: not found"))

    folder = _broken(files, tmp_path, "bad_json")
    (folder / "config.json").write_text('{"format": "mam_clap_encoder", ')
    cases.append((folder, r"bad_json/config.json: not valid JSON"))

    folder = _broken(files, tmp_path, "other_format")
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    cases.append((folder, r"other_format/config.json: format None, expected 'mam_clap_encoder'"))

    folder = _broken(files, tmp_path, "edited")
    (folder / "config.json").write_text(json.dumps({**config, "encoder": {**config["encoder"], "depth": 3}}))
    cases.append((folder, r"edited/config.json: differs from the config that .*edited/model.safetensors was written "
                          r"with \(fields \['encoder'\]\)"))

    folder = _broken(files, tmp_path, "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((folder, r"truncated/model.safetensors: not a readable safetensors file"))

    # weights without the config metadata (written by other tools) are checked against config.json
    folder = _broken(files, tmp_path, "cut")
    save_file({k: v for k, v in weights.items() if k != "blocks.1.mlp.fc2.bias"}, str(folder / "model.safetensors"))
    cases.append((folder, r"cut/model.safetensors: encoder weights do not match the config in .*cut/config.json: "
                          r"missing \['blocks.1.mlp.fc2.bias'\]"))

    folder = _broken(files, tmp_path, "wider")
    torch.manual_seed(2)
    wide = AudioEncoder(**{**ENCODER_KWARGS, "embed_dim": 64}).state_dict()
    save_file({k: v.contiguous() for k, v in wide.items()}, str(folder / "model.safetensors"))
    cases.append((folder, r"wider/model.safetensors: encoder weights do not fit the config in .*wider/config.json "
                          r"\(.*size mismatch"))

    for folder, message in cases:
        with pytest.raises(CheckpointError, match=message):
            MamClapEncoder.from_pretrained(folder)
        with pytest.raises(CheckpointError, match=message):
            mam_clap_plugin.load_encoder(str(folder))

    # a front end this code does not compute, consistent in both files: refused where stats are read
    folder = _broken(files, tmp_path, "mel80")
    other = {**config, "frontend": {**config["frontend"], "fbank_options": {**FBANK_OPTIONS, "num_mel_bins": 80}}}
    (folder / "config.json").write_text(json.dumps(other))
    save_file(weights, str(folder / "model.safetensors"), metadata={CONFIG_KEY: json.dumps(other)})
    for load in (MamClapEncoder.from_pretrained, mam_clap_plugin.load_encoder_with_stats, hear.load_model):
        with pytest.raises(CheckpointError, match=r"mel80/config.json: the encoder expects another front end"):
            load(str(folder))
    # a folder that is not a Hugging Face folder at all
    with pytest.raises(CheckpointError, match=r"config.json: not found"):
        mam_clap_plugin.load_encoder(str(tmp_path))
    # a config given to the class directly is checked as a loaded one is
    for broken, message in ((config["encoder"], r"format None"),
                            ({k: v for k, v in config.items() if k != "frontend"}, r"no \['frontend'\] object"),
                            ({**config, "version": 1}, r"version 1; MamClapEncoder takes")):
        with pytest.raises(CheckpointError, match=r"<config>: .*" + message):
            MamClapEncoder(broken)


def test_export_cli_hub(files, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "examples" / "export_encoder.py"))["main"]
    out = tmp_path / "mam-clap-encoder"
    assert main([files["pretraining"], str(out), "--hub", "--repo-id", "someone/mam-clap-tiny"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["source"] == {"file": "checkpoint_last.pt", "sha256": file_sha256(files["pretraining"]),
                                 "kind": "fairseq:supmam_clap", "variant": "MAM"}
    assert "- Pretrained as: MAM." in (out / "README.md").read_text()
    assert sorted(printed["files_mib"]) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == {k: v for k, v in printed.items()
                                                             if k not in ("out", "files_mib")}
    assert 'MamClapEncoder.from_pretrained("someone/mam-clap-tiny")' in (out / "README.md").read_text()
    assert_same_outputs(MamClapEncoder.from_pretrained(out), files["encoder"])
    # writing again into the same folder replaces the card and the files
    assert main([files["export"], str(out), "--hub"]) == 0
    capsys.readouterr()
    assert 'from_pretrained("REPO_ID_OR_FOLDER")' in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["source"]["kind"] == "mam_clap_encoder"
    # errors
    (tmp_path / "a_file").write_text("x")
    assert main([files["export"], str(tmp_path / "a_file"), "--hub"]) == 1
    assert "a_file: exists and is not a folder" in capsys.readouterr().err
    assert main([str(tmp_path / "no.pt"), str(tmp_path / "x"), "--hub"]) == 1
    assert "no.pt: checkpoint not found" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main([files["export"], str(tmp_path / "y.safetensors"), "--repo-id", "a/b"])
    assert "--repo-id goes with --hub" in capsys.readouterr().err


@pytest.mark.slow
def test_hub_cli_and_loading_without_fairseq(files, tmp_path):
    """In a process where importing fairseq or s3prl raises and the Hub is offline: the export
    CLI writes a folder, MamClapEncoder.from_pretrained, load_encoder and hear.load_model read it."""
    out = tmp_path / "mam-clap-encoder"
    code = (
        blocking_imports("fairseq", "s3prl")
        + "import runpy\n"
        f"sys.argv = ['export_encoder.py', {files['pretraining']!r}, {str(out)!r}, '--hub']\n"
        "try:\n"
        "    runpy.run_path('examples/export_encoder.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "import torch\n"
        "from mam_clap_plugin import hear, load_encoder\n"
        "from mam_clap_plugin.hub import MamClapEncoder\n"
        f"model = MamClapEncoder.from_pretrained({str(out)!r})\n"
        f"enc = load_encoder({str(out)!r})\n"
        "x = torch.randn(1, 1, 32, 128)\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(model.extract_features(x)['x'], enc.extract_features(x)['x'])\n"
        f"h = hear.load_model({str(out)!r})\n"
        "emb, ts = hear.get_timestamp_embeddings(torch.rand(2, 32000) * 2 - 1, h)\n"
        "print('shapes', tuple(emb.shape), tuple(ts.shape))\n"
        "assert 'fairseq' not in sys.modules and 's3prl' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shapes (2, 12, 32) (2, 12)" in proc.stdout
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.slow
def test_hub_folder_of_a_real_pretraining_checkpoint(pretraining_checkpoint, tmp_path):
    """A checkpoint written by fairseq-hydra-train -> --hub folder -> from_pretrained and the HEAR
    API: the same encoder as load_encoder(checkpoint)."""
    out = tmp_path / "mam-clap-encoder"
    config = export_hub_folder(pretraining_checkpoint, str(out))
    assert config["source"]["sha256"] == file_sha256(pretraining_checkpoint)
    assert config["encoder"]["embed_dim"] == PRETRAINED_DIM and config["encoder"]["depth"] == PRETRAINED_DEPTH
    model = MamClapEncoder.from_pretrained(out)
    assert_same_outputs(model, mam_clap_plugin.load_encoder(pretraining_checkpoint))
    h = hear.load_model(str(out))
    audio = torch.rand(3, 16000 * 3) * 2 - 1
    emb, ts = hear.get_timestamp_embeddings(audio, h)
    assert emb.shape == (3, 19, PRETRAINED_DIM) and ts.shape == (3, 19)
    assert hear.get_scene_embeddings(audio, h).shape == (3, PRETRAINED_DIM)
