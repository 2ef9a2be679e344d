"""Caption-trained CLAP teachers and the teacher interface, in process.

Caption-trained CLAP teachers and the teacher interface: the tokenizer round trip, caption files
and their errors, the model (front end in float32, global-batch BatchNorm), the contrastive loss
and its 2-process equality with one process, retrieval metrics, the teacher registry and contract,
and zero_shot.py's refusal of a checkpoint without a text tower we read. Training runs (recall
above chance; the checkpoint through extraction, the online teacher and fairseq's loader) are in
test_clap_teacher_train.py."""
import json
import os
import shutil
from math import comb

import fairseq  # noqa: F401  (registers the plugin's components on import below)
import numpy as np
import pytest
import sentencepiece
import soundfile as sf
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from mam_clap_fixtures.clap import save_random_clap_checkpoint
from mam_clap_plugin.criterions.clap_infonce import ClapInfoNceConfig, ClapInfoNceCriterion, infonce
from mam_clap_plugin.data.audio import AudioError, TeacherInputs
from mam_clap_plugin.data.caption_dataset import CaptionDataset
from mam_clap_plugin.data.captions import caption_rows, label_text, read_captions, split_captions, write_captions
from mam_clap_plugin.data.dataset import is_skipped_batch
from mam_clap_plugin.data.manifest import ManifestError, read_manifest
from mam_clap_plugin.metrics import retrieval_metrics
from mam_clap_plugin.models.clap_teacher import ClapTeacherModel, GlobalBatchNorm2d
from mam_clap_plugin.modules.precision import carry_exact, exact
from mam_clap_plugin.modules.text import SentencePieceTokenizer
from mam_clap_plugin.tasks.clap_teacher import ClapTeacherTask, ClapTeacherTaskConfig, TokenizerError
from mam_clap_plugin.teacher import (
    TEACHER_FORMATS,
    ClapCheckpointError,
    TeacherFormat,
    check_teacher,
    load_clap_teacher,
    load_teacher,
    register_teacher_format,
)
from mam_clap_plugin.teacher.caption import load_caption_clap

from .conftest import CLASSES, caption_teacher_config, load_script

zero_shot = load_script("examples/teacher/zero_shot.py")
train_tokenizer = load_script("examples/teacher/train_tokenizer.py")


def tokenizer_bytes(data: str) -> bytes:
    with open(os.path.join(data, "spm.model"), "rb") as f:
        return f.read()


def tiny_model(data: str, seed: int = 0, **overrides) -> ClapTeacherModel:
    cfg = caption_teacher_config(*(f"model.{k}={v}" for k, v in overrides.items()))
    spm = tokenizer_bytes(data)
    cfg["vocab_size"] = sentencepiece.SentencePieceProcessor(model_proto=spm).get_piece_size()
    torch.manual_seed(seed)
    return ClapTeacherModel.from_config_dict(cfg, spm)


def waves(model, batch: int, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(batch, model.num_samples, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- tokenizer and captions


def test_tokenizer_round_trip(caption_set, tmp_path, capsys):
    """train_tokenizer.py on a tiny caption set (no hard vocabulary limit), then captions -> ids ->
    captions through the module, whose bytes survive a state-dict round trip into an empty one."""
    data = shutil.copytree(caption_set, tmp_path / "data")
    write_captions(str(data / "train.cap"), [["the sound of low", "a low hum"], ["someone says yes, no and up"]] * 12)
    result = train_tokenizer.main([str(data), "--vocab-size", "1000"])
    assert result["captions"] == 36 and 8 < result["vocab_size"] < 1000 and result["asked"] == 1000
    assert "gave a vocabulary of" in capsys.readouterr().err
    tok = SentencePieceTokenizer(tokenizer_bytes(str(data)))
    assert tok.serialized() == (data / "spm.model").read_bytes() and tok.vocab_size == result["vocab_size"]
    sp = tok.processor
    for caption in ("the sound of low", "someone says yes, no and up", "a low hum"):
        row = tok.ids(caption, 32)
        assert row[0] == sp.bos_id() == 1 and row[-1] == sp.eos_id() == 2
        assert sp.decode(row[1:-1]) == caption
    ids, valid = tok(["a low hum", "the sound of low"], max_tokens=32)
    assert ids.shape == valid.shape and valid.sum(1).tolist() == [len(tok.ids("a low hum", 32)),
                                                                  len(tok.ids("the sound of low", 32))]
    assert (ids[~valid] == 0).all()
    assert len(tok.ids("the sound of low " * 20, 8)) == 8  # cut, bos and eos kept
    empty = SentencePieceTokenizer()
    empty.load_state_dict(tok.state_dict())
    assert empty.serialized() == tok.serialized()
    torch.testing.assert_close(empty(["a low hum"], 32)[0], tok(["a low hum"], 32)[0])


def test_caption_files_and_templates(tmp_path):
    assert label_text(["dog"]) == "dog" and label_text(["dog", "noise_burst"]) == "dog and noise burst"
    assert label_text(["a", "b", "c"]) == "a, b and c"
    rows = caption_rows([[0], [1, 2], [0]], ["yes", "no", "up"], ["the sound of {}", "someone says {}"], seed=1)
    assert sorted(rows[0]) == ["someone says yes", "the sound of yes"]
    assert sorted(rows[1]) == ["someone says no and up", "the sound of no and up"]
    assert caption_rows([[0]] * 40, ["x"], ["a {}", "b {}"], per_clip=1) != [["a x"]] * 40  # drawn per clip
    assert all(len(r) == 1 for r in caption_rows([[0]] * 5, ["x"], ["a {}", "b {}"], per_clip=1))
    with pytest.raises(ValueError, match="exactly one"):
        caption_rows([[0]], ["x"], ["no slot"])
    path = str(tmp_path / "train.cap")
    write_captions(path, [["a b", "c"], ["d"]])
    assert open(path).read() == "a b ||| c\nd\n"
    assert [split_captions(line, "x") for line in read_captions(path, 2)] == [["a b", "c"], ["d"]]


@pytest.mark.parametrize("content,match", [
    ("a\nb\n", r"train\.cap: caption file has 2 lines but .*train\.tsv has 3 entries"),
    ("a\n\nc\n", r"train\.cap:2: empty caption"),
    ("a ||| b\nc |||  ||| d\ne\n", r"train\.cap:2: empty caption \(caption 2 of 3"),
], ids=["line-count", "empty-line", "empty-between-separators"])
def test_bad_caption_files_name_file_and_line(caption_set, tmp_path, content, match):
    data = shutil.copytree(caption_set, tmp_path / "data")
    lines = (data / "train.tsv").read_text().splitlines()[:4]
    (data / "train.tsv").write_text("\n".join(lines) + "\n")  # 3 entries
    (data / "train.cap").write_text(content)
    task = ClapTeacherTask(OmegaConf.structured(ClapTeacherTaskConfig(
        data=str(data), sample_rate=48000, clip_seconds=0.64, train_subset="train", seed=1)))
    with pytest.raises(ManifestError, match=match):
        task.load_dataset("train")
    os.remove(data / "train.cap")
    with pytest.raises(ManifestError, match=r"train\.cap: caption file not found"):
        task.load_dataset("train")


def test_missing_or_broken_tokenizer_names_the_file(caption_set, tmp_path):
    data = shutil.copytree(caption_set, tmp_path / "data")
    os.remove(data / "spm.model")
    task = ClapTeacherTask(OmegaConf.structured(ClapTeacherTaskConfig(
        data=str(data), sample_rate=48000, clip_seconds=0.64, train_subset="train", seed=1)))
    cfg = OmegaConf.create(caption_teacher_config())
    with pytest.raises(TokenizerError, match=r"spm\.model: tokenizer \(task\.tokenizer\) not found.*train_tokenizer"):
        task.build_model(cfg)
    (data / "spm.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"spm\.model: not a sentencepiece model"):
        task.build_model(cfg)
    # rebuilt from a checkpoint, the task reads no tokenizer at all
    model = task.build_model(OmegaConf.create({**caption_teacher_config(), "vocab_size": 20}), from_checkpoint=True)
    assert model.tokenizer.model_bytes.numel() == 0


def test_dataset_draws_one_caption_per_clip_and_epoch(caption_set, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    manifest = read_manifest(os.path.join(caption_set, "train.tsv"))
    path = str(data / "train.cap")
    write_captions(path, [[f"c{i} {k}" for k in range(4)] for i in range(len(manifest))])
    caps = read_captions(path, len(manifest))
    train = CaptionDataset(manifest, caps, 48000, 30720, sample_captions=True, seed=3, shuffle=True)
    again = CaptionDataset(manifest, caps, 48000, 30720, sample_captions=True, seed=3, shuffle=True)
    drawn = {}
    for epoch in (1, 2, 3):
        train.set_epoch(epoch)
        again.set_epoch(epoch)
        drawn[epoch] = [train.caption(i) for i in range(len(manifest))]
        assert drawn[epoch] == [again.caption(i) for i in range(len(manifest))]  # any process draws the same
        assert all(c.startswith(f"c{i} ") for i, c in enumerate(drawn[epoch]))
    assert drawn[1] != drawn[2] and len({c for e in drawn.values() for c in e}) > len(manifest)
    valid = CaptionDataset(manifest, caps, 48000, 30720)
    assert [valid.caption(i) for i in range(3)] == ["c0 0", "c1 0", "c2 0"]
    batch = valid.collater([valid[0], valid[1]])
    assert batch["net_input"]["wav"].dtype == torch.int32 and batch["net_input"]["captions"] == ["c0 0", "c1 0"]
    # training keeps full global batches only: 24 clips, batches of 5, 2 ranks -> 4 batches of 5
    train.full_batches = (5, 2)
    batches = train.batch_by_size(np.arange(24), max_sentences=5)
    assert [len(b) for b in batches] == [5, 5, 5, 5]
    train.full_batches = (16, 2)
    with pytest.raises(ValueError, match="no training step of 2 x 16 clips"):
        train.batch_by_size(np.arange(24), max_sentences=16)


# ----------------------------------------------------------------------------- model and loss


def test_model_maps_and_embeddings(caption_set):
    model = tiny_model(caption_set).eval()
    wav = waves(model, 3)
    with torch.no_grad():
        tokens = model.audio_map(wav)
        out = model(wav, ["the sound of low", "the sound of mid", "the sound of high"])
    assert tokens.shape == (3, 2, 32, 128)  # HTS-AT's final map, as LAION's final layer
    assert out["audio"].shape == out["text"].shape == (3, 64)
    torch.testing.assert_close(out["audio"].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out["text"].norm(dim=1), torch.ones(3))
    assert out["scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)  # clamped at log 100
    fe = model.audio_branch.spectrogram_extractor
    assert not any(p.requires_grad for p in (*fe.parameters(), *model.audio_branch.logmel_extractor.parameters()))
    assert model.audio_branch.bn0.weight.requires_grad
    with pytest.raises(ValueError, match=r"expects \(batch, 30720\) waveforms"):
        model.audio_map(torch.zeros(1, 100))


def test_front_end_stays_float32_under_bf16(caption_set):
    """fairseq's common.bf16 casts the model; the STFT rows, the mel filterbank and bn0 stay float32
    (exactly the fp32 model's), so the log-mel is the same and the rest runs in bfloat16."""
    model = tiny_model(caption_set).eval()
    wav = waves(model, 2)
    with torch.no_grad():
        ref_mel = model.audio_branch.log_mel(wav)
        ref = model.encode_audio(wav)
    half = tiny_model(caption_set).eval().to(torch.bfloat16)
    branch = half.audio_branch
    for p in (branch.spectrogram_extractor.stft.conv_real.weight, branch.logmel_extractor.melW, branch.bn0.weight,
              branch.bn0.running_var):
        assert p.dtype == torch.float32
    torch.testing.assert_close(branch.spectrogram_extractor.stft.conv_real.weight,
                               model.audio_branch.spectrogram_extractor.stft.conv_real.weight, atol=0, rtol=0)
    assert branch.patch_embed.proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(branch.log_mel(wav), ref_mel, atol=0, rtol=0)
        emb = half.encode_audio(carry_exact(wav))
    assert emb.dtype == torch.float32 and torch.nn.functional.cosine_similarity(emb, ref).min() > 0.98


def test_infonce_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    t = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    s = torch.tensor(7.0)
    logits = (s * a @ t.T).double()
    expected = -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
    assert infonce(a, t, s).item() == pytest.approx(expected.item(), rel=1e-6)


def test_global_batch_norm_is_batch_norm_in_one_process():
    g = torch.Generator().manual_seed(0)
    x = 20 * torch.randn(4, 1, 9, 6, generator=g) - 50
    ref, ours = torch.nn.BatchNorm2d(6), GlobalBatchNorm2d(6)
    torch.testing.assert_close(ours(x.transpose(1, 3)), ref(x.transpose(1, 3)))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.half().weight.dtype == torch.float32


def _step(model, criterion, wav, captions, ids):
    sample = {"id": ids, "nsentences": len(captions),
              "net_input": {"wav": carry_exact(wav), "captions": captions}}
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    return log["loss"].item(), sample_size


def _ddp_worker(rank, init, data, out_dir):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = tiny_model(data, clip_seconds=0.32).train()
    criterion = ClapInfoNceCriterion(ClapInfoNceConfig(), task=None).train()
    wav, captions = _global_batch(model)
    # ranks hold 3 and 5 clips: the sizes are exchanged
    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    logged, sample_size = _step(model, criterion, wav[rows], captions[rows], torch.arange(8)[rows])
    # fairseq: DDP averages the gradients, then multiplies them by W / (summed sample sizes)
    total = torch.tensor([float(sample_size), logged])
    torch.distributed.all_reduce(total)
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            grads[name] = p.grad / 2 * 2 / total[0]
    torch.save({"loss": (total[1] / total[0]).item(), "grads": grads,
                "bn": (model.audio_branch.bn0.running_mean.clone(), model.audio_branch.bn0.running_var.clone())},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _global_batch(model):
    captions = [f"the sound of {CLASSES[i % 3]}" for i in range(8)]
    return waves(model, 8, seed=5), captions


@pytest.mark.slow
def test_two_processes_equal_one_process(caption_set, tmp_path):
    """criterion.gather: 2 gloo processes with 3 + 5 clips give the loss, the gradient of every
    parameter and the BatchNorm statistics of one process with the 8 clips together."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_ddp_worker, args=(init, caption_set, str(tmp_path)), nprocs=2, start_method="fork")
    model = tiny_model(caption_set, clip_seconds=0.32).train()
    criterion = ClapInfoNceCriterion(ClapInfoNceConfig(), task=None).train()
    wav, captions = _global_batch(model)
    loss, _ = _step(model, criterion, wav, captions, torch.arange(8))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
        names = {n for n, p in model.named_parameters() if p.grad is not None}
        assert set(got["grads"]) == names and "logit_scale" in names and "text_branch.pos_embed" in names
        for name, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=2e-4, atol=2e-6, msg=name)
        torch.testing.assert_close(got["bn"][0], model.audio_branch.bn0.running_mean)
        torch.testing.assert_close(got["bn"][1], model.audio_branch.bn0.running_var)


# ----------------------------------------------------------------------------- retrieval metrics


def _brute_force_recall(audio, text, captions, k):
    """Per clip: its caption among the distinct ones; per caption query: any clip bearing it."""
    distinct = list(dict.fromkeys(captions))
    first = [captions.index(c) for c in distinct]
    a2t, t2a = [], []
    for i, c in enumerate(captions):
        scores = [float(audio[i] @ text[j]) for j in first]
        a2t.append(sorted(range(len(distinct)), key=lambda u: -scores[u]).index(distinct.index(c)) < k)
        clip_scores = [float(audio[j] @ text[captions.index(c)]) for j in range(len(captions))]
        order = sorted(range(len(captions)), key=lambda j: -clip_scores[j])
        t2a.append(any(captions[j] == c for j in order[:k]))
    return 100 * np.mean(a2t), 100 * np.mean(t2a)


def test_retrieval_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    captions = ["a", "b", "a", "c", "d", "b", "e", "a", "f", "g", "h", "c"]
    audio = rng.standard_normal((12, 6))
    text = {c: rng.standard_normal(6) for c in set(captions)}
    text = np.stack([text[c] for c in captions])
    res = retrieval_metrics(audio, text, captions)
    assert res.num_clips == 12 and res.num_captions == 8
    for k in (1, 5, 10):
        a2t, t2a = _brute_force_recall(audio, text, captions, k)
        assert res.recall[f"a2t_r{k}"] == pytest.approx(a2t) and res.recall[f"t2a_r{k}"] == pytest.approx(t2a)
        assert res.chance[f"a2t_r{k}"] == pytest.approx(100 * min(k, 8) / 8)
        sizes = {c: captions.count(c) for c in captions}
        assert res.chance[f"t2a_r{k}"] == pytest.approx(
            100 * np.mean([1 - comb(12 - sizes[c], k) / comb(12, k) for c in captions]))
    perfect = retrieval_metrics(np.eye(4), np.eye(4), ["w", "x", "y", "z"])
    assert all(v == 100.0 for v in perfect.recall.values()) and perfect.chance["a2t_r1"] == 25.0


# ----------------------------------------------------------------------------- registry and contract


def test_registry_reads_a_caption_teacher_strictly(caption_set, caption_teacher_checkpoint, tmp_path):
    ckpt = torch.load(caption_teacher_checkpoint, weights_only=True)
    model = ClapTeacherModel.from_config_dict(ckpt["cfg"]["model"], ckpt["model"]["tokenizer.model_bytes"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    teacher = load_teacher(caption_teacher_checkpoint)
    assert teacher.name == "caption-clap-htsat-e32-d111-h2.4.8" and teacher.layout == "caption"
    assert (teacher.grid, teacher.dim, teacher.sample_rate, teacher.seconds, teacher.num_samples) == (
        (2, 32), 128, 48000, 0.64, 30720)
    assert teacher.freq_edges_hz() == pytest.approx(load_clap_teacher(
        save_random_clap_checkpoint(str(tmp_path / "l.pt"), "laion", embed_dim=16, depths=[1, 1, 1, 1],
                                    num_heads=[1, 1, 1, 1])).freq_edges_hz())  # same 50-14000 Hz mel grid
    wav = waves(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(teacher(wav), model.audio_map(wav), atol=1e-5, rtol=1e-5)
        projected = load_teacher(caption_teacher_checkpoint, projection=True)
        assert projected.dim == 64
        torch.testing.assert_close(projected(wav), model.audio_projection(model.audio_map(wav)), atol=1e-5, rtol=1e-5)
    # the whole model (both towers) for zero-shot
    full = load_caption_clap(caption_teacher_checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(full.encode_text(["the sound of low"]), model.encode_text(["the sound of low"]))

    def rewrite(name, edit):
        data = torch.load(caption_teacher_checkpoint, weights_only=True)
        edit(data)
        path = str(tmp_path / name)
        torch.save(data, path)
        return path

    extra = rewrite("extra.pt", lambda c: c["model"].__setitem__("audio_branch.extra.weight", torch.zeros(2)))
    with pytest.raises(ClapCheckpointError, match=r"extra\.pt.*audio_branch.\*' tower.*extra\.weight"):
        load_teacher(extra)
    stray = rewrite("stray.pt", lambda c: c["model"].__setitem__("decoder.weight", torch.zeros(2)))
    with pytest.raises(ClapCheckpointError, match=r"stray\.pt: unexpected keys.*decoder\.weight"):
        load_teacher(stray)
    missing = rewrite("missing.pt", lambda c: c["model"].pop("audio_branch.norm.weight"))
    with pytest.raises(ClapCheckpointError, match=r"missing keys: norm\.weight"):
        load_teacher(missing)
    nofe = rewrite("nofe.pt", lambda c: c["cfg"]["model"].pop("clip_seconds"))
    with pytest.raises(ClapCheckpointError, match=r"lacks the front-end fields \['clip_seconds'\]"):
        load_teacher(nofe)
    with pytest.raises(ClapCheckpointError, match="'stage3' needs 4 HTS-AT stages, found 3"):
        load_teacher(caption_teacher_checkpoint, "stage3")


def test_registry_keeps_laion_and_refuses_the_unknown(tmp_path):
    laion = save_random_clap_checkpoint(str(tmp_path / "laion.pt"), "laion", embed_dim=16, depths=[1, 1, 1, 1],
                                        num_heads=[1, 1, 1, 1])
    teacher = load_teacher(laion, projection=True)
    assert teacher.layout == "laion" and teacher.dim == 512
    other = str(tmp_path / "other.pt")
    torch.save({"cfg": {"model": {"_name": "supmam_clap"}}, "model": {"encoder.cls_token": torch.zeros(1)}}, other)
    with pytest.raises(ClapCheckpointError) as err:
        load_teacher(other)
    msg = str(err.value)
    assert msg.startswith(f"{other}: no teacher format recognises this file")
    assert all(f"{f.name}: {f.expects}" in msg for f in TEACHER_FORMATS)


def test_adding_a_format_is_one_entry(tmp_path, monkeypatch):
    """A new format: a detect and a load in one entry; what it returns is checked against the contract."""
    laion = save_random_clap_checkpoint(str(tmp_path / "laion.pt"), "laion", embed_dim=16, depths=[1, 1, 1, 1],
                                        num_heads=[1, 1, 1, 1])
    mine = str(tmp_path / "mine.pt")
    torch.save({"my_teacher": laion}, mine)
    monkeypatch.setattr("mam_clap_plugin.teacher.registry.TEACHER_FORMATS", list(TEACHER_FORMATS))
    register_teacher_format(TeacherFormat(
        "mine", "a dict with 'my_teacher' naming a LAION file",
        detect=lambda path, ckpt: isinstance(ckpt, dict) and "my_teacher" in ckpt,
        load=lambda path, *, checkpoint, layer, projection: load_clap_teacher(checkpoint["my_teacher"], layer,
                                                                              projection)))
    assert load_teacher(mine).name.startswith("laion-clap-htsat")
    register_teacher_format(TeacherFormat("mine", "x", lambda path, ckpt: "my_teacher" in ckpt,
                                          lambda path, **kw: torch.nn.Linear(2, 2)), first=True)
    with pytest.raises(TypeError, match=r"mine.pt \(mine\): the loader returned a Linear, not a teacher"):
        load_teacher(mine)


def test_contract_check_names_what_is_wrong(tmp_path):
    teacher = load_clap_teacher(save_random_clap_checkpoint(str(tmp_path / "l.pt"), "laion", embed_dim=16,
                                                            depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]))
    assert check_teacher(teacher, "ok") is teacher
    teacher.num_samples = 5
    with pytest.raises(TypeError, match=r"bad: .*num_samples 5 != round\(seconds 10.0 x sample_rate 48000\)"):
        check_teacher(teacher, "bad")
    teacher.num_samples, teacher.freq_edges_hz = 480000, lambda: [100.0, 50.0, 14000.0]
    with pytest.raises(TypeError, match=r"freq_edges_hz\(\) \[100.0, 50.0, 14000.0\] are not grid_freq \+ 1 = 3 asc"):
        check_teacher(teacher, "bad")
    del teacher.freq_edges_hz
    teacher.grid = (2, 0)
    with pytest.raises(TypeError, match=r"grid \(2, 0\) is not"):
        check_teacher(teacher, "bad")
    teacher.grid = (2, 32)
    next(teacher.parameters()).requires_grad_(True)
    with pytest.raises(TypeError, match="not frozen"):
        check_teacher(teacher, "bad")


def test_zero_shot_refuses_a_checkpoint_without_a_text_tower_we_read(caption_set, tmp_path):
    laion = save_random_clap_checkpoint(str(tmp_path / "laion.pt"), "laion", embed_dim=16, depths=[1, 1, 1, 1],
                                        num_heads=[1, 1, 1, 1])
    with pytest.raises(ClapCheckpointError, match=r"laion\.pt: a laion-clap/ms-clap checkpoint, whose text tower "
                                                  r"this project does not read"):
        zero_shot.main([laion, caption_set, "valid"])


def test_zero_shot_on_an_untrained_teacher(caption_set, caption_teacher_checkpoint, tmp_path, capsys):
    """The script's report: accuracy and mAP next to chance, retrieval next to chance, last line accuracy."""
    out = str(tmp_path / "zs.json")
    report = zero_shot.main([caption_teacher_checkpoint, caption_set, "valid", "--retrieval", "--json", out,
                             "--num-workers", "0", "--template", "the sound of {}", "--template", "a {} tone"])
    assert json.load(open(out)) == report
    cls = report["classification"]
    assert cls["num_classes"] == 3 and not cls["multi_label"] and cls["chance"]["accuracy"] == pytest.approx(100 / 3)
    assert cls["templates"] == ["the sound of {}", "a {} tone"] and 0 <= cls["accuracy"] <= 100
    retrieval = report["retrieval"]
    assert retrieval["num_captions"] == 3 and retrieval["chance"]["a2t_r1"] == pytest.approx(100 / 3)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"accuracy {cls['accuracy']:.2f}"


# ----------------------------------------------------------------------------- bad audio (task.skip_bad_files)


def _private_set(caption_set, dst, remove=(), truncate=()) -> str:
    """A copy of the caption set, its manifests pointing at the copy's audio; ``remove``d files
    deleted, ``truncate``d ones rewritten with 0.2 s of the manifest's 0.6 s."""
    data = shutil.copytree(caption_set, dst)
    for split in ("train", "valid"):
        lines = open(data / f"{split}.tsv").read().splitlines()
        open(data / f"{split}.tsv", "w").write("\n".join([str(data / "audio"), *lines[1:]]) + "\n")
    for name in remove:
        os.remove(data / "audio" / name)
    for name in truncate:
        wav, rate = sf.read(data / "audio" / name, dtype="float32")
        sf.write(data / "audio" / name, wav[: int(0.2 * rate)], rate)
    return data


def _caption_dataset(data, split="train", **kwargs) -> CaptionDataset:
    manifest = read_manifest(os.path.join(data, f"{split}.tsv"))
    return CaptionDataset(manifest, read_captions(os.path.join(data, f"{split}.cap"), len(manifest)), 48000, 30720,
                          **kwargs)


def test_caption_dataset_skips_and_counts_bad_files(caption_set, tmp_path):
    """With skip_bad_files a missing file is a skipped item naming it; the collater drops and counts
    it (skipped_share of the epoch's clips), and a batch whose clips were all skipped holds a
    placeholder (a zero clip, an empty caption, id -1) that is_skipped_batch recognises, never {}."""
    data = _private_set(caption_set, tmp_path / "data", remove=("train_0.wav", "train_1.wav"))
    with pytest.raises(AudioError, match=r"train\.tsv:2: \S+train_0\.wav: audio file not found"):
        _caption_dataset(data)[0]
    dataset = _caption_dataset(data, skip_bad_files=True)
    item = dataset[0]
    assert item["id"] == 0 and item["skipped_file"] == f"{data / 'train.tsv'}:2: {data / 'audio' / 'train_0.wav'}"
    assert "audio file not found" in item["skipped"]
    batch = dataset.collater([dataset[i] for i in range(4)])
    assert not is_skipped_batch(batch) and batch["id"].tolist() == [2, 3] and batch["nsentences"] == 2
    assert batch["num_skipped"] == 2 and batch["skipped_share"] == pytest.approx(2 / 24)
    assert batch["skipped_files"][1].endswith("train_1.wav") and "not found" in batch["skipped_reason"]
    assert batch["net_input"]["wav"].shape == (2, 30720) and len(batch["net_input"]["captions"]) == 2
    empty = dataset.collater([dataset[0], dataset[1]])
    assert is_skipped_batch(empty) and empty["id"].tolist() == [-1] and empty["nsentences"] == 0
    assert empty["num_skipped"] == 2 and empty["net_input"]["captions"] == [""]
    assert not exact(empty["net_input"]["wav"]).any() and empty["net_input"]["wav"].shape == (1, 30720)
    assert dataset.collater([]) == {}  # fairseq's padding of uneven shards: no items at all


def test_caption_dataset_refuses_truncated_audio(caption_set, tmp_path):
    """A file shorter than its manifest line says is refused naming it (as extraction and zero-shot
    refuse it), and skipped and counted with skip_bad_files."""
    data = _private_set(caption_set, tmp_path / "data", truncate=("train_2.wav",))
    with pytest.raises(AudioError, match=r"train\.tsv:4: \S+train_2\.wav: truncated audio: 3200 samples, but the "
                                         r"manifest says 9600"):
        _caption_dataset(data)[2]
    dataset = _caption_dataset(data, skip_bad_files=True)
    assert "truncated audio" in dataset[2]["skipped"] and dataset[2]["skipped_file"].endswith("train_2.wav")
    batch = dataset.collater([dataset[i] for i in range(4)])
    assert batch["id"].tolist() == [0, 1, 3] and batch["num_skipped"] == 1
    # TeacherInputs (extraction, zero-shot) reads through the same helper
    assert "truncated audio" in TeacherInputs(dataset.manifest, [2], 48000, 30720)[0][2]


def _teacher_task_and_model(data, **task_fields):
    from types import SimpleNamespace

    task = ClapTeacherTask(OmegaConf.structured(ClapTeacherTaskConfig(
        data=str(data), sample_rate=48000, clip_seconds=0.64, train_subset="train", seed=1, **task_fields)))
    torch.manual_seed(0)
    model = task.build_model(OmegaConf.create(caption_teacher_config()))
    criterion = ClapInfoNceCriterion(ClapInfoNceConfig(), task)
    optimizer = SimpleNamespace(backward=lambda loss: loss.backward())  # all FairseqTask.train_step calls
    return task, model, criterion, optimizer


def test_clap_teacher_task_bounds_skipped_clips(caption_set, tmp_path):
    """The clap_teacher task counts and bounds skipped clips as pretraining does: an all-skipped batch
    runs its placeholder with zero loss, no gradient, no clip and bn0's statistics untouched, with the
    logging keys of a real batch; past task.max_skipped_fraction the run stops naming the files; in
    validation the placeholder stays out of the loss and of the retrieval metrics."""
    from fairseq import metrics

    from mam_clap_plugin.tasks.base import SkippedFilesError

    removed = [f"train_{i}.wav" for i in range(8)] + ["valid_0.wav"]
    data = _private_set(caption_set, tmp_path / "data", remove=removed)
    task, model, criterion, optimizer = _teacher_task_and_model(data, skip_bad_files=True, max_skipped_fraction=0.2)
    assert task.max_skipped_fraction == 0.2
    task.load_dataset("train")
    dataset = task.datasets["train"]
    batch = dataset.collater([dataset[i] for i in range(4)])
    bn = model.audio_branch.bn0
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    model.train()
    criterion.train()
    task.begin_epoch(1, model)
    loss, sample_size, log = task.train_step(batch, model, criterion, optimizer, 0)
    assert sample_size == 0 and log["nsentences"] == 0 and log["num_skipped"] == 4 and loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
    assert not bn.placeholder
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics([log], criterion)
    assert agg["skipped_files"].sum == 4  # 4 of 24 clips: within the bound of 0.2
    good = dataset.collater([dataset[i] for i in range(8, 12)])
    _, size, good_log = task.train_step(good, model, criterion, optimizer, 1)
    assert size == 1 and good_log["nsentences"] == 4 and good_log["loss"] > 0
    assert bn.num_batches_tracked == before[2] + 1  # a real batch updates the statistics
    assert {k: torch.is_tensor(v) for k, v in log.items()} == {k: torch.is_tensor(v) for k, v in good_log.items()}
    with pytest.raises(SkippedFilesError, match=r"^8 of the 24 clips of this training epoch were skipped as "
                                                r"unusable \(33\.3%.*first skipped in this process: .*train_0\.wav"):
        with metrics.aggregate(new_root=True):
            task.reduce_metrics([good_log, log], criterion)

    task.load_dataset("valid")
    valid = task.datasets["valid"]
    task.begin_valid_epoch(1, model)
    model.eval()
    criterion.eval()  # as fairseq's trainer does before valid_step
    with metrics.aggregate(new_root=True) as agg:
        loss, size, vlog = task.valid_step(valid.collater([valid[0]]), model, criterion)
        _, _, real = task.valid_step(valid.collater([valid[1], valid[2]]), model, criterion)
    assert size == 0 and vlog["num_skipped"] == 1 and vlog["skipped_share"] == pytest.approx(1 / 12)
    assert vlog.keys() == real.keys() and not vlog["loss"] and real["loss"] > 0 and loss.item() == 0.0
    assert agg["mean_recall"].result.num_clips == 2  # the placeholder is not a clip
    with pytest.raises(SkippedFilesError, match="1 of the 12 clips of this validation pass"):
        task.max_skipped_fraction = 0.05
        with metrics.aggregate(new_root=True):
            task.reduce_metrics([vlog], criterion)


def test_task_configs_share_the_skip_fields():
    from mam_clap_plugin.tasks.base import MAX_SKIPPED_FRACTION, FbankTaskConfig
    from mam_clap_plugin.tasks.mam_clap_finetuning import MamClapFinetuningConfig
    from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig

    for config in (ClapTeacherTaskConfig, MamClapPretrainingConfig, MamClapFinetuningConfig):
        assert issubclass(config, FbankTaskConfig)
        assert config().max_skipped_fraction == MAX_SKIPPED_FRACTION and config().skip_bad_files is False
    with pytest.raises(ValueError, match=r"task.max_skipped_fraction=1.5 must be in \[0, 1\]"):
        ClapTeacherTask(OmegaConf.structured(ClapTeacherTaskConfig(
            data="unused", sample_rate=48000, clip_seconds=0.64, train_subset="train", seed=1,
            max_skipped_fraction=1.5)))
