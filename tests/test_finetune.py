"""Fine-tuning components, in-process: metrics, masking, augmentations, sampling, model_path, configs.

Metrics (vs scikit-learn, 2-process gather), the encoder's drop_path and token masking,
augmentations, weighted sampling, the classifier's loading of each kind of model_path and its
layer-decay tags, the task's data checks, and the recipes in examples/finetuning/config."""
import os
import shutil

import fairseq  # noqa: F401  (registers the plugin's components on import below)
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from fairseq.data import data_utils
from omegaconf import OmegaConf
from sklearn.metrics import average_precision_score

from mam_clap_plugin.checkpoint import CheckpointError, export_encoder
from mam_clap_plugin.criterions.mam_clap_classification import classification_loss
from mam_clap_plugin.data.augment import mix_labels, mix_waveforms, spec_augment
from mam_clap_plugin.data.manifest import ManifestError
from mam_clap_plugin.data.sampling import clip_weights, draw_epoch, read_weights, write_weights
from mam_clap_plugin.metrics import classification_metrics, gather_clips, log_clip_scores
from mam_clap_plugin.models.mam_clap_classifier import MamClapClassifier
from mam_clap_plugin.modules.encoder import AudioEncoder, time_freq_masking
from mam_clap_plugin.modules.transformer import Block
from mam_clap_plugin.tasks.mam_clap_finetuning import MamClapFinetuningConfig, MamClapFinetuningTask

from .audiomae import audiomae_encoder, decoder_keys, finetuned, released
from .conftest import REPO
from .helpers import LR, build, config_names, expectation, full_cfg, model_cfg, save_pretraining_checkpoint, task_cfg

# ---------------------------------------------------------------- metrics


def known_predictions(seed=0, n=40, k=5):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < 0.3).astype(np.float32)
    labels[:, 3] = 0  # a class with no positive
    labels[np.arange(n), rng.integers(0, 3, n)] = 1
    scores = labels * 0.5 + rng.random((n, k))
    return scores, labels


def test_map_and_accuracy_match_sklearn():
    scores, labels = known_predictions()
    res = classification_metrics(scores, labels)
    keep = [0, 1, 2, 4]
    expected = 100 * average_precision_score(labels[:, keep], scores[:, keep], average="macro")
    assert res.mAP == pytest.approx(expected)
    assert res.left_out == 1 and np.isnan(res.per_class_ap[3])
    assert res.per_class_ap[0] == pytest.approx(100 * average_precision_score(labels[:, 0], scores[:, 0]))
    top1 = scores.argmax(1)
    assert res.accuracy == pytest.approx(100 * labels[np.arange(len(labels)), top1].mean())
    assert res.num_clips == 40


def _gather_worker(rank, init, out_dir):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    scores, labels = known_predictions()
    ids = np.arange(len(scores))
    mine = ids[rank::2]
    mine = np.concatenate([mine, mine[:3]])  # a repeated (dummy) batch is counted once
    got = gather_clips(mine, scores[mine], labels[mine])
    res = classification_metrics(*got[1:])
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.array([res.mAP, res.accuracy, len(got[0])]))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_equals_single_process(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_gather_worker, args=(init, str(tmp_path)), nprocs=2, start_method="fork")
    scores, labels = known_predictions()
    single = classification_metrics(scores, labels)
    for rank in (0, 1):
        mAP, acc, n = np.load(tmp_path / f"rank{rank}.npy")
        assert mAP == pytest.approx(single.mAP) and acc == pytest.approx(single.accuracy) and n == 40


def test_meter_lives_in_the_validation_aggregator_only():
    from fairseq import metrics

    scores, labels = known_predictions()
    with metrics.aggregate("valid"):
        with metrics.aggregate(new_root=True) as agg:
            with metrics.aggregate("valid") as persistent:
                for start in (0, 20, 0):  # the last batch repeats clips (fairseq's dummy batch)
                    ids = torch.arange(start, start + 20)
                    log_clip_scores(ids, torch.from_numpy(scores[start:start + 20]),
                                    torch.from_numpy(labels[start:start + 20]))
    values = agg.get_smoothed_values()
    single = classification_metrics(scores, labels)
    assert values["mAP"] == pytest.approx(single.mAP)
    assert values["accuracy"] == pytest.approx(single.accuracy)
    assert values["mAP_classes_left_out"] == 1
    assert "mAP" not in persistent


# ---------------------------------------------------------------- losses and augmentation


def test_losses_take_soft_targets():
    logits = torch.randn(4, 3)
    hard = torch.eye(3)[[0, 1, 2, 0]]
    soft = mix_labels(hard, torch.eye(3)[[1, 1, 0, 2]], 0.7)
    assert torch.allclose(soft.sum(1), torch.ones(4))
    assert torch.allclose(soft[0], torch.tensor([0.7, 0.3, 0.0]))
    ce = classification_loss(logits, soft, "ce", 0.1)
    smoothed = 0.9 * soft + 0.1 / 3
    assert ce.item() == pytest.approx(-(smoothed * logits.log_softmax(1)).sum(1).mean().item(), rel=1e-5)
    bce = classification_loss(logits, soft, "bce")
    assert bce.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(logits, soft).item())


def test_mix_waveforms_fits_partner_length():
    a, b = torch.ones(10), 2 * torch.ones(6)
    mixed = mix_waveforms(a, b, 0.25)
    assert mixed.shape == (10,)
    assert torch.allclose(mixed[:6], torch.full((6,), 0.25 + 1.5)) and torch.allclose(mixed[6:], torch.full((4,), 0.25))


def test_spec_augment_masks_one_band_per_axis_and_keeps_global_rng():
    fbank = torch.randn(100, 128) + 10
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    out = spec_augment(fbank, 48, 40, np.random.default_rng(0))
    assert torch.rand(1) == before  # global torch RNG untouched
    zero_bins = (out == 0).all(dim=0)
    zero_frames = (out == 0).all(dim=1)
    assert zero_bins.sum() < 48 and zero_frames.sum() < 40
    assert torch.equal(out, spec_augment(fbank, 48, 40, np.random.default_rng(0)))


# ---------------------------------------------------------------- encoder: drop_path, token masking


def test_time_freq_masking_keeps_whole_columns_and_rows():
    m = time_freq_masking(3, 64, 8, 0.2, 0.2)
    assert m.ids_keep.shape == (3, 51 * 6)
    for b in range(3):
        visible = ~m.mask[b].reshape(64, 8)
        cols, rows = visible.any(1), visible.any(0)
        assert cols.sum() == 51 and rows.sum() == 6
        assert torch.equal(visible, cols[:, None] & rows[None, :])
        assert torch.equal(m.ids_keep[b], visible.reshape(-1).nonzero().squeeze(1))  # grid order


def test_time_freq_masking_needs_no_sync(request):
    """The visible count is known on the host (columns kept x rows kept): drawing the masks reads
    nothing back from the device (fine-tuning's training forward)."""
    request.getfixturevalue("no_syncs")
    assert time_freq_masking(2, 64, 8, 0.2, 0.2).ids_keep.shape == (2, 51 * 6)


def test_block_drop_path_default_off_and_eval_identity():
    assert Block(16, 2).drop_path.drop_prob == 0.0
    enc = AudioEncoder(32, 3, 4, max_frames=64, drop_path=0.2)
    assert [b.drop_path.drop_prob for b in enc.blocks] == pytest.approx([0.0, 0.1, 0.2])
    x = torch.randn(2, 1, 64, 128)
    enc.eval()
    assert torch.equal(enc(x)[0], enc(x)[0])
    with pytest.raises(ValueError, match="drop_path"):
        enc.set_drop_path(1.0)


# ---------------------------------------------------------------- data: weighted sampling


def test_clip_weights_formula_and_file_round_trip(tmp_path):
    labels = [[0], [0, 1], [2], [0]]
    w = clip_weights(labels, 3)
    cw = 1000 / (np.array([3, 1, 1]) + 0.01)
    assert w == pytest.approx([cw[0], cw[0] + cw[1], cw[2], cw[0]])
    write_weights(tmp_path / "train.weights", w)
    assert read_weights(str(tmp_path / "train.weights"), 4) == pytest.approx(w)
    with pytest.raises(ManifestError, match="4 weights but the manifest has 3"):
        read_weights(str(tmp_path / "train.weights"), 3)


def test_weighted_draw_follows_the_weights():
    with data_utils.numpy_seed(1 + 2):
        a = draw_epoch(np.array([1.0, 0.0, 3.0]), 4000)
    with data_utils.numpy_seed(1 + 2):
        assert np.array_equal(a, draw_epoch(np.array([1.0, 0.0, 3.0]), 4000))
    assert (a != 1).all() and abs((a == 2).mean() - 0.75) < 0.03


# ---------------------------------------------------------------- task and model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from .conftest import write_tone_set

    root = write_tone_set(str(tmp_path_factory.mktemp("ft_tones")), counts=(("train", 12), ("valid", 6)))
    labels = [[i % 3] for i in range(12)]
    write_weights(os.path.join(root, "train.weights"), clip_weights(labels, 3))
    return root


def test_task_data_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="target_length=100 must be a positive multiple of 16"):
        MamClapFinetuningTask.setup_task(task_cfg(data_dir, target_length=100))
    with pytest.raises(FileNotFoundError, match="task.data"):
        MamClapFinetuningTask.setup_task(task_cfg(str(tmp_path / "nowhere")))
    bad = shutil.copytree(data_dir, tmp_path / "bad")
    lines = open(bad / "valid.lbl").read().splitlines()
    lines[2] = "7"
    open(bad / "valid.lbl", "w").write("\n".join(lines) + "\n")
    task = MamClapFinetuningTask.setup_task(task_cfg(str(bad)))
    with pytest.raises(ManifestError, match=r"valid.lbl:3: class id 7 outside \[0, 3\)"):
        task.load_dataset("valid")
    with pytest.raises(ValueError, match=r"classes.txt: 3 classes, but model.num_classes=5"):
        task.build_model(model_cfg(num_classes=5))
    with pytest.raises(ValueError, match="target_length=2048 is longer"):
        MamClapFinetuningTask.setup_task(task_cfg(data_dir, target_length=2048)).build_model(model_cfg())
    names = ["low", "mid", "loud"]
    with pytest.raises(ManifestError, match="first difference at id 2"):
        task.check_class_list(names, "other/classes.txt")


def test_augmentations_in_training_split_only(data_dir):
    task = MamClapFinetuningTask.setup_task(task_cfg(data_dir, mixup=1.0, freqm=20, timem=10))
    task.load_dataset("train")
    task.load_dataset("valid")
    train, valid = task.datasets["train"], task.datasets["valid"]
    assert train.augment is not None and valid.augment is None
    item = train[0]
    assert item["label"].sum() == pytest.approx(1.0) and (item["label"] > 0).sum() >= 1
    assert torch.equal(train[0]["source"], item["source"])  # same seed, epoch, clip: same augmentation
    train.set_epoch(2)
    assert not torch.equal(train[0]["source"], item["source"])
    assert torch.equal(valid[0]["label"], torch.eye(3)[0])


def test_weighted_epochs_are_reproducible_and_disjoint_across_ranks(data_dir):
    task = MamClapFinetuningTask.setup_task(task_cfg(data_dir, sample_weights="weights", epoch_size=30))
    task.load_dataset("train")
    ds = task.datasets["train"]

    def batches(epoch, shard):
        itr = task.get_batch_iterator(ds, max_sentences=3, seed=1, epoch=epoch, num_shards=2, shard_id=shard)
        return [b["id"].tolist() for b in itr.next_epoch_itr(shuffle=True)]

    a0, a1 = batches(1, 0), batches(1, 1)
    assert len(a0) == len(a1) == 5
    with data_utils.numpy_seed(1 + 1):
        drawn = draw_epoch(ds.sample_weights, 30)
    assert sorted(sum(a0 + a1, [])) == sorted(drawn.tolist())  # the ranks split one draw
    assert batches(1, 0) == a0  # redrawn identically (a resumed run)
    assert batches(2, 0) != a0
    itr = task.get_batch_iterator(ds, max_sentences=3, seed=1, epoch=1, num_shards=2, shard_id=0)
    epoch = itr.next_epoch_itr(shuffle=True)
    first = [next(epoch)["id"].tolist() for _ in range(2)]
    state = itr.state_dict()
    resumed = task.get_batch_iterator(ds, max_sentences=3, seed=1, epoch=1, num_shards=2, shard_id=0)
    resumed.load_state_dict(state)
    assert first + [b["id"].tolist() for b in resumed.next_epoch_itr(shuffle=True)] == a0


@pytest.mark.parametrize("kind", ["pretraining", "export"])
def test_short_finetune_loads_long_pretraining_checkpoint(data_dir, tmp_path, kind):
    """A 128-frame fine-tune from a 1024-frame pretraining checkpoint (or its export)."""
    path = str(tmp_path / "checkpoint_last.pt")
    encoder = save_pretraining_checkpoint(path)
    if kind == "export":
        export_encoder(path, str(tmp_path / "encoder.pt"))
        path = str(tmp_path / "encoder.pt")
    task = MamClapFinetuningTask.setup_task(task_cfg(data_dir, target_length=128))
    cfg = model_cfg(model_path=path, encoder_embed_dim=768, encoder_layers=12)  # the file's architecture wins
    model = task.build_model(cfg)
    assert cfg.encoder_embed_dim == 32 and cfg.encoder_layers == 2 and cfg.max_frames == 1024 and cfg.num_classes == 3
    for k, v in encoder.state_dict().items():
        if not k.startswith("norm."):  # mean pooling drops the final norm (fc_norm replaces it)
            assert torch.equal(model.encoder.state_dict()[k], v), k
    task.load_dataset("valid")
    ds = task.datasets["valid"]
    batch = ds.collater([ds[i] for i in range(4)])
    model.eval()
    assert model(**batch["net_input"])["logits"].shape == (4, 3)
    assert model.head.weight.std() < 1e-4


def test_random_init_and_bad_model_paths(data_dir, tmp_path):
    task = MamClapFinetuningTask.setup_task(task_cfg(data_dir))
    model = task.build_model(model_cfg())
    assert isinstance(model, MamClapClassifier) and model.encoder.embed_dim == 32
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        task.build_model(model_cfg(model_path=str(tmp_path / "missing.pt")))
    torch.save({"cfg": {"model": {"_name": "wav2vec2"}}, "model": {}}, tmp_path / "w2v.pt")
    with pytest.raises(CheckpointError, match="w2v.pt: model is 'wav2vec2'"):
        task.build_model(model_cfg(model_path=str(tmp_path / "w2v.pt")))
    path = tmp_path / "mismatch.pt"
    save_pretraining_checkpoint(path)
    state = torch.load(path, weights_only=True)
    state["model"]["encoder.blocks.9.extra"] = torch.zeros(1)
    del state["model"]["encoder.cls_token"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing \['cls_token'\], unexpected \['blocks.9.extra'\]"):
        task.build_model(model_cfg(model_path=str(path)))


def test_layer_decay_tags(data_dir):
    task = MamClapFinetuningTask.setup_task(task_cfg(data_dir))
    model = task.build_model(model_cfg(layer_decay=0.5))
    tags = {n: p.optim_overrides["optimizer"] for n, p in model.named_parameters()}
    # L = 2: patch embedding / cls 0.5^3, block 0 0.5^2, block 1 0.5, head and fc_norm 1
    assert tags["encoder.patch_embed.weight"] == {"lr_scale": 0.125}
    assert tags["encoder.cls_token"] == {"lr_scale": 0.125, "weight_decay": 0.0}
    assert tags["encoder.blocks.0.attn.qkv.weight"] == {"lr_scale": 0.25}
    assert tags["encoder.blocks.1.mlp.fc2.bias"] == {"lr_scale": 0.5, "weight_decay": 0.0}
    assert tags["head.weight"] == {"lr_scale": 1.0}
    assert tags["fc_norm.weight"] == {"lr_scale": 1.0, "weight_decay": 0.0}
    assert "encoder.norm.weight" not in tags  # mean pooling: fc_norm replaces the final norm
    cls_model = task.build_model(model_cfg(pooling="cls"))
    assert "encoder.norm.weight" in dict(cls_model.named_parameters())


def test_token_masking_in_training_only(data_dir, monkeypatch):
    task = MamClapFinetuningTask.setup_task(task_cfg(data_dir, target_length=128))
    model = task.build_model(model_cfg(drop_path=0.0))
    seen = []
    monkeypatch.setattr(model.encoder.blocks[0], "forward", lambda x, attn_mask=None: seen.append(x.shape[1]) or x)
    source = torch.randn(2, 1, 128, 128)
    model.train()
    model(source)
    model.eval()
    model(source)
    assert seen == [1 + 6 * 6, 1 + 8 * 8]  # 8 time columns -> 6, 8 rows -> 6; all 64 tokens in eval


@pytest.mark.slow
def test_sample_weights_script(data_dir, tmp_path):
    import subprocess
    import sys

    from .conftest import REPO

    out = tmp_path / "train.weights"
    subprocess.run([sys.executable, os.path.join(REPO, "examples", "finetuning", "sample_weights.py"), data_dir,
                    "train", "--out", str(out)], check=True, capture_output=True)
    expected = clip_weights([[i % 3] for i in range(12)], 3)
    assert read_weights(str(out), 12) == pytest.approx(expected, rel=1e-8)


# ---------------------------------------------------------------- configs

FT_CONFIG_DIR = os.path.join(REPO, "examples", "finetuning", "config")
#: The expected values of each recipe in FT_CONFIG_DIR (the tests run over the files there, so a new
#: recipe fails until it has a row here).
RECIPES = {  # name: (blr, batch, epochs, warmup epochs, weight decay, target_length, loss, freqm, timem, metric)
    "as20k": (1e-3, 32, 60, 4, 5e-4, 1024, "bce", 48, 192, "mAP"),
    "as2m": (2e-4, 256, 100, 10, 5e-4, 1024, "bce", 48, 192, "mAP"),
    "esc50": (1e-3, 64, 50, 5, 0.05, 512, "ce", 48, 96, "accuracy"),
    "spcv1": (1e-3, 256, 50, 5, 5e-4, 128, "ce", 48, 48, "accuracy"),
    "spcv2": (1e-3, 256, 50, 5, 5e-4, 128, "ce", 48, 48, "accuracy"),
}


def test_every_recipe_row_has_a_file():
    stale = sorted(set(RECIPES) - set(config_names(FT_CONFIG_DIR)))
    assert not stale, f"RECIPES rows without a file in {os.path.relpath(FT_CONFIG_DIR, REPO)}: {stale}"


@pytest.mark.parametrize("name", config_names(FT_CONFIG_DIR))
def test_recipe_configs(name):
    from mam_clap_plugin.criterions.mam_clap_classification import MamClapClassificationConfig
    from mam_clap_plugin.models.mam_clap_classifier import MamClapClassifierConfig

    blr, batch, epochs, warmup, wd, length, loss, freqm, timem, metric = expectation(
        RECIPES, name, FT_CONFIG_DIR, "RECIPES in tests/test_finetune.py")
    cfg_dir = FT_CONFIG_DIR
    base, recipe = OmegaConf.load(f"{cfg_dir}/base.yaml"), OmegaConf.load(f"{cfg_dir}/{name}.yaml")
    assert list(recipe.defaults) == ["_self_", "base"]
    both = [(s, k) for s in recipe if s != "defaults" and s in base for k in recipe[s] if k in base[s]]
    assert not both, both  # base is merged last: a key in both would silently take the base's value
    cfg = OmegaConf.merge(recipe, base)
    for section, dc in (("task", MamClapFinetuningConfig), ("model", MamClapClassifierConfig),
                        ("criterion", MamClapClassificationConfig)):
        import dataclasses

        fields = {f.name for f in dataclasses.fields(dc) if not f.name.startswith("_")}
        assert set(cfg[section]) - {"_name"} == fields, (section, fields ^ set(cfg[section]))
    eff_batch = cfg.dataset.batch_size * cfg.optimization.update_freq[0]
    assert eff_batch == batch
    assert cfg.optimization.lr[0] == pytest.approx(blr * batch / 256)
    assert cfg.optimization.max_epoch == epochs
    updates_per_epoch = cfg.optimization.max_update / epochs
    assert cfg.lr_scheduler.warmup_updates == pytest.approx(warmup * updates_per_epoch, rel=0.01)
    assert cfg.optimizer.weight_decay == wd and cfg.optimizer._name == "mam_clap_adamw"
    assert (cfg.task.target_length, cfg.criterion.loss, cfg.task.freqm, cfg.task.timem) == (length, loss, freqm, timem)
    assert (cfg.model.layer_decay, cfg.model.drop_path, cfg.task.mixup) == (0.75, 0.1, 0.5)
    assert (cfg.model.mask_t_prob, cfg.model.mask_f_prob) == (0.2, 0.2)
    assert cfg.checkpoint.best_checkpoint_metric == metric and cfg.checkpoint.maximize_best_checkpoint_metric
    assert (cfg.task.sample_weights is not None) == (name == "as2m")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_layer_decay_reaches_fairseq_optimizer_through_the_scheduler(data_dir, precision):
    """The per-group lr of the built fairseq optimizer after scheduler steps (fp16: no flattening)."""
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    cfg = full_cfg(**({"fp16": True, "fp16_no_flatten_grads": True} if precision == "fp16" else {}))
    task = MamClapFinetuningTask.setup_task(task_cfg(data_dir))
    model = task.build_model(model_cfg(layer_decay=0.75))
    if precision == "fp16":
        model = model.half()
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build(cfg, model)
    sched = build_lr_scheduler(cfg.lr_scheduler, opt)
    for update in range(7):
        lr = sched.step_update(update)
    assert lr < LR  # past the 4 warmup updates, into the cosine decay
    expected = {"encoder.patch_embed.weight": 0.75 ** 3, "encoder.cls_token": 0.75 ** 3,
                "encoder.blocks.0.attn.qkv.weight": 0.75 ** 2, "encoder.blocks.1.mlp.fc1.weight": 0.75,
                "head.weight": 1.0, "fc_norm.bias": 1.0}
    fp32_of = dict(zip(map(id, opt.fp32_params), model.parameters())) if precision == "fp16" else {}
    seen = {}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(fp32_of.get(id(p), p))]
            seen[name] = (group["lr"] / lr, group["weight_decay"])
    for name, scale in expected.items():
        assert seen[name][0] == pytest.approx(scale), name
    assert seen["encoder.cls_token"][1] == 0.0 and seen["fc_norm.bias"][1] == 0.0
    assert seen["head.weight"][1] == cfg.optimizer.weight_decay


def test_converted_audiomae_file_as_model_path(data_dir, tmp_path):
    """A converted AudioMAE file (pretraining and fine-tuned layouts) starts a 128-frame fine-tune."""
    from mam_clap_plugin.convert import convert_audiomae

    enc = audiomae_encoder(64, 2, seed=7)
    torch.save(released({**enc, **decoder_keys(64)}), tmp_path / "pretrained.pth")
    torch.save(released(finetuned(enc)), tmp_path / "finetuned.pth")
    task = MamClapFinetuningTask.setup_task(task_cfg(data_dir, target_length=128))
    for name in ("pretrained", "finetuned"):
        out = str(tmp_path / f"{name}.safetensors")
        convert_audiomae(str(tmp_path / f"{name}.pth"), out, num_heads=4)
        cfg = model_cfg(model_path=out)
        model = task.build_model(cfg).eval()
        assert (cfg.encoder_embed_dim, cfg.encoder_layers, cfg.encoder_attention_heads) == (64, 2, 4)
        assert torch.equal(model.encoder.blocks[1].attn.qkv.weight, enc["blocks.1.attn.qkv.weight"])
        assert torch.equal(model.encoder.cls_token, enc["cls_token"])
        assert model(torch.randn(2, 1, 128, 128))["logits"].shape == (2, 3)


def _readme_finetune_commands():
    from . import readme

    return (readme.commands(readme.section("# Fine-tuning"))
            + readme.commands(readme.section("## Reproducing the paper")))


def test_readme_finetune_commands_compose(monkeypatch):
    """The README's fairseq-hydra-train commands of the fine-tuning sections compose as written."""
    import shlex

    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose, initialize_config_dir

    from .conftest import REPO

    commands = _readme_finetune_commands()
    assert len(commands) >= 5
    monkeypatch.setenv("USER_DIR", "/plugin")
    for command in commands:
        words = shlex.split(os.path.expandvars(command))
        config_dir = os.path.join(REPO, words[words.index("--config-dir") + 1])
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        name = words[words.index("--config-name") + 1]
        hydra_init(name)
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose(config_name=name, overrides=overrides)
        assert cfg.common.user_dir == "/plugin" and not os.path.isabs(cfg.task.data), command
