"""Converting AudioMAE checkpoints into this encoder (mam_clap_plugin/convert.py, the CLI).

The CLI is examples/convert/audiomae_to_mam_clap.py. Random weights are written in AudioMAE's
released key layout and shapes (ViT-B: 768 wide, 12 blocks, pos_embed (1, 513, 768); a fine-tuned
file without norm.* but with fc_norm.* and a 527-class head) and in timm's (bare state dict,
safetensors); the converted encoder's tokens must equal the reference forward pass of
tests/audiomae.py, written from the checkpoint's tensors alone (no AudioMAE code is used).
"""
import json
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mam_clap_plugin import load_encoder, load_encoder_with_stats
from mam_clap_plugin.checkpoint import CheckpointError, sidecar_path
from mam_clap_plugin.convert import ConversionError, convert_audiomae, convert_state_dict
from mam_clap_plugin.data.audio import NORM_STATS
from upstream.expert import UpstreamExpert

from .audiomae import audiomae_encoder, decoder_keys, finetuned, reference_forward, released

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "examples" / "convert" / "audiomae_to_mam_clap.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_tokens_match(encoder, sd, fbank, num_heads):
    with torch.no_grad():
        got = encoder.extract_features(fbank)
        layers, out = reference_forward(sd, fbank, num_heads)
    assert len(got["layer_results"]) == len(layers)
    for i, (a, b) in enumerate(zip(got["layer_results"], layers)):
        assert (a - b).abs().max().item() <= 1e-5, f"layer {i}"
    assert (got["x"] - out).abs().max().item() <= 1e-5


def test_vit_b_layout_parity():
    """AudioMAE's exact ViT-B layout and shapes (12 blocks, pos_embed (1, 513, 768), 527-class
    head), pretraining and fine-tuned, converted in memory (writing 350 MB files would only
    time the disk: the file path is the same code, tested below on narrow files saved as
    AudioMAE saves them); a short input keeps the forward passes fast."""
    enc = audiomae_encoder(768, 12)
    conv = convert_state_dict({**enc, **decoder_keys(768)}, num_heads=None)
    assert conv.config == {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "max_frames": 1024,
                           "num_mel_bins": 128, "final_norm": True}
    assert conv.kind == "pretraining" and conv.head is None and len(conv.dropped) == 20
    assert torch.equal(conv.encoder.pos_embed, enc["pos_embed"])  # kept as stored, not recomputed
    torch.manual_seed(0)
    assert_tokens_match(conv.encoder, enc, torch.randn(1, 1, 32, 128), 12)
    ft = finetuned(enc)
    conv = convert_state_dict(ft)
    assert conv.kind == "finetuning" and conv.config["final_norm"] is False and conv.dropped == []
    assert sorted(conv.head) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert conv.head["head.weight"].shape == (527, 768)
    # no final norm: the output is the last block's tokens, as in AudioMAE's fine-tuned model
    assert_tokens_match(conv.encoder, ft, torch.randn(1, 1, 32, 128), 12)


@pytest.fixture(scope="module")
def released_files(tmp_path_factory):
    """AudioMAE-layout files as AudioMAE's training script saves them (narrow: 64 wide,
    2 blocks, all 513 positions), pretraining and fine-tuned, and their conversions."""
    root = tmp_path_factory.mktemp("audiomae")
    enc = audiomae_encoder(64, 2, seed=7)
    pre_path, ft_path = root / "pretrained.pth", root / "finetuned.pth"
    torch.save(released({**enc, **decoder_keys(64)}), pre_path)
    ft = finetuned(enc)
    torch.save(released(ft), ft_path)
    pre_meta = convert_audiomae(str(pre_path), str(root / "pretrained.safetensors"), num_heads=4)
    ft_meta = convert_audiomae(str(ft_path), str(root / "finetuned.safetensors"), num_heads=4)
    return {"enc": enc, "ft": ft, "pre": str(root / "pretrained.safetensors"),
            "ftout": str(root / "finetuned.safetensors"), "pre_meta": pre_meta, "ft_meta": ft_meta,
            "pre_src": str(pre_path)}


def test_released_pretraining_file(released_files):
    meta = released_files["pre_meta"]
    assert meta["encoder"] == {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0, "max_frames": 1024,
                               "num_mel_bins": 128, "final_norm": True}
    assert meta["kind"] == "pretraining" and meta["head"] is None
    assert "mask_token" in meta["dropped"] and "decoder_pred.weight" in meta["dropped"]
    assert all(k == "mask_token" or k.startswith("decoder_") for k in meta["dropped"]) and len(meta["dropped"]) == 20
    encoder = load_encoder(released_files["pre"])
    assert torch.equal(encoder.pos_embed, released_files["enc"]["pos_embed"])
    torch.manual_seed(0)
    # the full 1024 frames (all 512 positions) and a shorter clip (its first 8 * t rows)
    assert_tokens_match(encoder, released_files["enc"], torch.randn(2, 1, 1024, 128), 4)
    assert_tokens_match(encoder, released_files["enc"], torch.randn(1, 1, 96, 128), 4)


def test_released_finetuned_file_keeps_head(released_files):
    meta = released_files["ft_meta"]
    assert meta["kind"] == "finetuning" and meta["encoder"]["final_norm"] is False and meta["dropped"] == []
    assert meta["head"] == {"num_classes": 527, "pooling": "mean", "fc_norm": True, "source": "audiomae",
                            "keys": ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]}
    tensors = load_file(released_files["ftout"])
    for k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
        assert torch.equal(tensors[k], released_files["ft"][k]), k
    assert not any(k.startswith("norm.") for k in tensors)
    bundle = load_encoder_with_stats(released_files["ftout"])
    assert (bundle.norm_mean, bundle.norm_std) == NORM_STATS["audioset"] and bundle.target_length == 1024
    torch.manual_seed(1)
    assert_tokens_match(bundle.encoder, released_files["ft"], torch.randn(1, 1, 128, 128), 4)


def test_export_config_names_the_source(released_files):
    cfg = json.loads(Path(sidecar_path(released_files["pre"])).read_text())
    from mam_clap_plugin.files import file_sha256

    assert cfg["source"]["sha256"] == file_sha256(released_files["pre_src"])
    assert cfg["source"]["kind"] == "audiomae:pretraining"
    assert cfg["source"]["file"] == "pretrained.pth" and len(cfg["source"]["dropped"]) == 20
    assert cfg["frontend"]["norm_stats"]["spec"] == "audioset" and cfg["frontend"]["target_length"] == 1024


def test_timm_layout(tmp_path):
    """timm's bare state dict as safetensors and as a torch file (under state_dict, with a
    DDP prefix) give the same encoder; the latter written as the torch export."""
    enc = audiomae_encoder(64, 2, seed=3)
    save_file(enc, str(tmp_path / "model.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in enc.items()}}, tmp_path / "timm.pth")
    convert_audiomae(str(tmp_path / "model.safetensors"), str(tmp_path / "a.safetensors"), num_heads=4)
    convert_audiomae(str(tmp_path / "timm.pth"), str(tmp_path / "b.pt"), num_heads=4)  # torch export
    a, b = load_encoder(str(tmp_path / "a.safetensors")), load_encoder(str(tmp_path / "b.pt"))
    torch.manual_seed(2)
    fbank = torch.randn(2, 1, 256, 128)
    assert_tokens_match(a, enc, fbank, 4)
    assert_tokens_match(b, enc, fbank, 4)


def test_strict_mapping_errors(tmp_path):
    enc = audiomae_encoder(64, 2)
    broken = {k: v for k, v in enc.items() if k != "blocks.1.attn.qkv.bias"}
    broken["blocks.0.ls1.gamma"] = torch.ones(64)
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(ConversionError) as err:
        convert_audiomae(str(tmp_path / "broken.pth"), str(tmp_path / "x.safetensors"), num_heads=4)
    msg = str(err.value)
    assert "broken.pth" in msg and "missing keys ['blocks.1.attn.qkv.bias']" in msg
    assert "unexpected keys ['blocks.0.ls1.gamma']" in msg
    # a pretraining file without norm.* (and without a head) misses it
    torch.save({"model": {k: v for k, v in enc.items() if not k.startswith("norm.")}}, tmp_path / "nonorm.pth")
    with pytest.raises(ConversionError, match=r"missing keys \['norm.bias', 'norm.weight'\]"):
        convert_audiomae(str(tmp_path / "nonorm.pth"), str(tmp_path / "x.safetensors"), num_heads=4)
    bad = dict(enc, **{"patch_embed.proj.weight": torch.zeros(64, 3, 16, 16)})  # an RGB ImageNet patch conv
    torch.save({"model": bad}, tmp_path / "rgb.pth")
    rgb = r"patch_embed.proj.weight \(64, 3, 16, 16\) \(expected \(64, 1, 16, 16\)\)"
    with pytest.raises(ConversionError, match=rgb):
        convert_audiomae(str(tmp_path / "rgb.pth"), str(tmp_path / "x.safetensors"), num_heads=4)
    half_head = dict(finetuned(enc, classes=5))
    del half_head["fc_norm.bias"]
    torch.save({"model": half_head}, tmp_path / "head.pth")
    with pytest.raises(ConversionError, match=r"missing \['fc_norm.bias'\]"):
        convert_audiomae(str(tmp_path / "head.pth"), str(tmp_path / "x.safetensors"), num_heads=4)
    assert not (tmp_path / "x.safetensors").exists()
    # an unconverted AudioMAE file given to the loader says what to do
    with pytest.raises(CheckpointError, match="audiomae_to_mam_clap.py"):
        load_encoder(str(tmp_path / "broken.pth"))


def test_cli_and_upstream(tmp_path, capsys):
    """The CLI's report (dropped keys), then the file as the s3prl upstream's -k."""
    enc = audiomae_encoder(64, 2, seed=5)
    torch.save(released({**enc, **decoder_keys(64)}), tmp_path / "pretrained.pth")
    main = runpy.run_path(str(CLI))["main"]
    out = tmp_path / "audiomae.safetensors"
    assert main([str(tmp_path / "pretrained.pth"), str(out), "--num-heads", "4"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["encoder"]["depth"] == 2 and len(report["source"]["dropped"]) == 20
    assert ("dropped 20 decoder keys: decoder_blocks.* (12), decoder_embed.* (2), decoder_norm.* (2), "
            "decoder_pos_embed, decoder_pred.* (2), mask_token") in captured.err
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "y.safetensors")]) == 1
    assert "missing.pth" in capsys.readouterr().err

    from upstream.hubconf import supmam_clap_local

    expert = supmam_clap_local(str(out)).eval()
    assert isinstance(expert, UpstreamExpert)
    g = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(16000, generator=g)
    with torch.no_grad():
        hs = expert([wav])["hidden_states"]
        fbank = expert.clip_fbank(wav)[None, None]
        layers, _ = reference_forward(enc, fbank, 4)
    assert len(hs) == 3 and hs[-1].shape == (1, 7, 64)
    want = layers[-1][:, 1:].reshape(1, 7, 8, 64).mean(dim=2)
    assert (hs[-1] - want).abs().max().item() <= 1e-5


def run_cli(cwd, *args):
    """The converter as a user runs it: a subprocess in ``cwd`` with relative paths."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_every_output_form(tmp_path):
    """Every output form the script's docstring documents, through the CLI: a pretraining file
    into OUT.safetensors (+ OUT.json) and into OUT.pt (the torch export), a fine-tuned file into
    .safetensors (head kept) and into .pt (refused: exit 1, the error names the file, nothing
    written). Each written file loads and gives the reference tokens."""
    enc = audiomae_encoder(64, 2, seed=11)
    torch.save(released({**enc, **decoder_keys(64)}), tmp_path / "pretrained.pth")
    torch.save(released(finetuned(enc)), tmp_path / "finetuned.pth")
    torch.manual_seed(4)
    fbank = torch.randn(1, 1, 128, 128)
    for out in ("audiomae.safetensors", "audiomae.pt"):
        proc = run_cli(tmp_path, "pretrained.pth", out, "--num-heads", "4")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["out"] == out and report["kind"] == "pretraining" and report["head"] is None
        assert report["encoder"]["depth"] == 2 and report["encoder"]["embed_dim"] == 64
        assert len(report["dropped"]) == 20
        assert f"-> {out}: 2 blocks, width 64, 1024 frames; no head; dropped 20 decoder keys" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert_tokens_match(load_encoder(str(tmp_path / out)), enc, fbank, 4)
    assert (tmp_path / "audiomae.json").is_file() and not (tmp_path / "audiomae.pt.json").exists()
    assert torch.load(tmp_path / "audiomae.pt", weights_only=True)["version"] == 1  # the torch export
    proc = run_cli(tmp_path, "finetuned.pth", "ft.safetensors", "--num-heads", "4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["head"]["num_classes"] == 527 and report["kind"] == "finetuning"
    assert "head 527 classes kept" in proc.stderr and (tmp_path / "ft.json").is_file()
    assert torch.equal(load_file(str(tmp_path / "ft.safetensors"))["head.weight"], finetuned(enc)["head.weight"])
    proc = run_cli(tmp_path, "finetuned.pth", "ft.pt", "--num-heads", "4")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "ft.pt: a classifier head is kept only in a .safetensors export" in proc.stderr
    assert not (tmp_path / "ft.pt").exists() and not (tmp_path / "ft.pt.tmp").exists()


@pytest.mark.slow
def test_pretraining_continues_from_converted_audiomae_file(tone_set, tmp_path):
    """model.encoder_init through fairseq-hydra-train: MAM-CLAP (+size=tiny: 64 wide, 2 blocks,
    4 heads, 1024-frame table, the shapes of this narrow AudioMAE-layout file) starts from the
    converted encoder, with a fresh decoder and head; the same command again resumes from its
    checkpoint_last.pt instead, and says so."""
    from mam_clap_plugin.checkpoint import load_checkpoint
    from mam_clap_plugin.hydra_runs import run_hydra_train

    from .conftest import CONFIG_DIR

    enc = audiomae_encoder(64, 2, seed=13)
    torch.save(released({**enc, **decoder_keys(64)}), tmp_path / "pretrained.pth")
    convert_audiomae(str(tmp_path / "pretrained.pth"), str(tmp_path / "audiomae.safetensors"), num_heads=4)
    save_dir = tmp_path / "checkpoints"
    args = ["+size=tiny", f"task.data={tone_set}", f"task.target_store={tone_set}/targets", "task.target_length=64",
            f"model.encoder_init={tmp_path / 'audiomae.safetensors'}", f"checkpoint.save_dir={save_dir}",
            "common.cpu=true", "common.log_interval=1", "dataset.batch_size=6", "dataset.num_workers=0",
            "optimization.update_freq=[1]", "optimization.lr=[1e-6]", "lr_scheduler.warmup_updates=0",
            "checkpoint.save_interval_updates=0"]
    run = run_hydra_train(CONFIG_DIR, "mam_clap", args + ["optimization.max_update=1"], str(tmp_path / "run1"))
    assert "model.encoder_init: encoder weights from" in run.text and "audiomae.safetensors" in run.text
    assert "they replace the encoder from model.encoder_init" not in run.text
    assert [r["num_updates"] for r in run.records["train_inner"]] == [1.0]
    saved = load_checkpoint(str(save_dir / "checkpoint_last.pt"))["model"]
    # the position table is a buffer (never trained): exactly the file's; the weights moved by ~lr only
    assert torch.equal(saved["encoder.pos_embed"], enc["pos_embed"])
    assert torch.allclose(saved["encoder.blocks.1.mlp.fc2.weight"], enc["blocks.1.mlp.fc2.weight"], atol=1e-4)
    assert torch.allclose(saved["encoder.patch_embed.weight"], enc["patch_embed.proj.weight"], atol=1e-4)
    assert saved["decoder.embed.weight"].shape == (64, 64)  # a fresh decoder at the encoder's width

    rerun = run_hydra_train(CONFIG_DIR, "mam_clap", args + ["optimization.max_update=2"], str(tmp_path / "run2"))
    assert "they replace the encoder from model.encoder_init" in rerun.text
    assert "checkpoint_last.pt" in rerun.text and "@ 1 updates" in rerun.text
    assert [r["num_updates"] for r in rerun.records["train_inner"]] == [2.0]
