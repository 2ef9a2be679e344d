"""The pretraining configs (examples/pretraining/config): the paper's four variants and the README's commands.

One shared base (Hydra defaults) and variants that state only what differs; every plugin field
is listed (so any can be overridden on the command line without `+`); the variant settings are
the paper's; every README command composes. The tests run over the YAML files in the folder."""
import dataclasses
import os

import fairseq  # noqa: F401  (registers the plugin's components)
import pytest
from omegaconf import OmegaConf

import mam_clap_plugin  # noqa: F401
from mam_clap_plugin.criterions.supmam_clap import SupMamClapCriterionConfig
from mam_clap_plugin.hydra_runs import compose_config
from mam_clap_plugin.models.supmam_clap import SupMamClapConfig
from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig

from . import readme
from .conftest import CONFIG_DIR, REPO
from .helpers import config_names, expectation

#: The paper's settings of each variant in CONFIG_DIR (the tests run over the files there, so a new
#: config fails until it has a row here).
PAPER = {  # variant: (mask ratio, target, classification branch, lambda_cls, decoder blocks, decoder width,
    #          where Y_v comes from)
    "mam": (0.8, "pixel", False, 0.0, 16, 512, "decoder"),
    "mam_clap": (0.2, "clap", False, 0.0, 1, 768, "encoder"),
    "supmam": (0.4, "pixel", True, 0.01, 16, 512, "decoder"),
    "supmam_clap": (0.2, "clap", True, 1e-4, 1, 768, "encoder"),
}


def test_every_paper_row_has_a_file():
    stale = sorted(set(PAPER) - set(config_names(CONFIG_DIR)))
    assert not stale, f"PAPER rows without a file in {os.path.relpath(CONFIG_DIR, REPO)}: {stale}"


def load(name, overrides=("task.data=manifests",)):
    return compose_config(CONFIG_DIR, name, overrides)


def leaves(cfg, prefix=""):
    """Dotted keys of the values set in a config file (defaults list and hydra node aside)."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    out = set()
    for k, v in cfg.items():
        if k in ("defaults", "hydra"):
            continue
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


@pytest.mark.parametrize("name", config_names(CONFIG_DIR))
def test_every_field_is_listed(name):
    cfg = load(name)
    for section, dc in (("task", MamClapPretrainingConfig), ("model", SupMamClapConfig),
                        ("criterion", SupMamClapCriterionConfig)):
        fields = {f.name for f in dataclasses.fields(dc) if not f.name.startswith("_")}
        listed = set(cfg[section].keys()) - {"_name"}
        assert listed == fields, (section, fields ^ listed)


@pytest.mark.parametrize("name", config_names(CONFIG_DIR))
def test_variant_states_only_what_differs(name):
    """fairseq's schema fills the variant's unlisted fields with fairseq defaults, and the
    base, merged after it, sets the shared ones: a key set in both would silently take the
    base's value."""
    base = OmegaConf.load(os.path.join(CONFIG_DIR, "base.yaml"))
    variant = OmegaConf.load(os.path.join(CONFIG_DIR, f"{name}.yaml"))
    assert list(variant.defaults) == ["_self_", "base"]
    assert not leaves(base) & leaves(variant)
    assert len(leaves(variant)) <= 8
    # the shared values survive composition (not replaced by fairseq's defaults)
    cfg = load(name)
    assert cfg.common.log_format == "json" and cfg.optimization.update_freq == [4]
    assert cfg.checkpoint.no_epoch_checkpoints is True and cfg.task._name == "mam_clap_pretraining"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_tiny_size_builds(name):
    """+size=tiny keeps every variant buildable: its decoder is as wide as its encoder, which the
    CLAP variants' visible_prediction=encoder needs."""
    from mam_clap_plugin.models.supmam_clap import SupMamClapModel

    model_cfg = OmegaConf.to_container(load(name, ("task.data=manifests", "+size=tiny")).model, resolve=True)
    model_cfg.pop("_name")
    model_cfg.update(target_dim=24 if model_cfg["target"] == "clap" else 0, num_classes=3)
    model = SupMamClapModel(SupMamClapConfig(**model_cfg))
    assert model.decoder.blocks[0].kind == "swinv2" and model.cfg.decoder_embed_dim == 64


def test_lr_header_states_both_readings():
    """The config header states the two readings of the paper's lr (absolute 2e-4, or AudioMAE's
    base lr x batch / 256 = 1e-4) next to the value."""
    text = open(os.path.join(CONFIG_DIR, "base.yaml")).read()
    header = text[: text.index("hydra:")]
    assert "2e-4 x 128 / 256 = 1e-4" in header and "absolute lr" in header
    assert "lr: [0.0002]  #" in text


def test_runs_stay_in_the_start_directory():
    hydra = OmegaConf.load(os.path.join(CONFIG_DIR, "base.yaml")).hydra
    assert hydra.run.dir == "." and hydra.job.chdir is False
    save_dir = OmegaConf.load(os.path.join(CONFIG_DIR, "base.yaml")).checkpoint._get_node("save_dir")._value()
    assert save_dir == "${hydra:runtime.output_dir}/checkpoints/${hydra:job.config_name}"


def test_no_dead_keys():
    """skip_invalid_size_inputs_valid_test does nothing here: the task has no max_positions."""
    for name in config_names(CONFIG_DIR):
        assert "skip_invalid_size_inputs_valid_test" not in open(os.path.join(CONFIG_DIR, f"{name}.yaml")).read()
    assert "skip_invalid_size_inputs_valid_test" not in open(os.path.join(CONFIG_DIR, "base.yaml")).read()


@pytest.mark.parametrize("name", config_names(CONFIG_DIR))
def test_paper_settings(name):
    ratio, target, branch, lam, dec, width, visible = expectation(PAPER, name, CONFIG_DIR,
                                                                  "PAPER in tests/test_pretrain_configs.py")
    cfg = load(name)
    m = cfg.model
    assert (m.mask_ratio, m.target, m.classification_branch, cfg.criterion.lambda_cls, m.decoder_layers) == (
        ratio, target, branch, lam, dec)
    # one head h for Y_v = h(Z_v) and Y_m: the CLAP variants' decoder runs at the encoder's width
    assert (m.decoder_embed_dim, m.visible_prediction) == (width, visible)
    assert m.decoder_embed_dim % m.decoder_attention_heads == 0
    # ViT-B encoder, AdamW at 2e-4, total batch 128, AudioMAE's Swin V2 decoder block with 4x4
    # windows shifted by 2 in time, eq. 1 as squared error averaged over the teacher's channels
    assert (m.encoder_embed_dim, m.encoder_layers, m.encoder_attention_heads) == (768, 12, 12)
    assert cfg.optimizer._name == "mam_clap_adamw" and cfg.optimization.lr == [0.0002]
    assert cfg.dataset.batch_size * cfg.optimization.update_freq[0] == 128
    assert (m.decoder_window_time, m.decoder_window_freq, m.decoder_shift_time, m.decoder_shift_freq) == (4, 4, 2, 0)
    assert m.decoder_block == "swinv2" and cfg.criterion.clap_loss == "mse" and m.encoder_init is None
    assert (cfg.task.labels is not None) == branch
    # teacher targets are chosen on the command line (offline store or online teacher);
    # the configs fix the paper's teacher map: LAION-CLAP's final map, no projection
    assert cfg.task.target_store is None and cfg.task.teacher_checkpoint is None
    assert cfg.task.teacher_layer == "final" and cfg.task.teacher_projection is False


README_COMMANDS = (readme.commands(readme.section("# CLAP teacher")) + readme.commands(readme.section("# Pretraining"))
                   + readme.commands(readme.section("## The paper's ablations as overrides")))


def test_readme_shows_every_variant():
    assert len(README_COMMANDS) >= 10
    assert {readme.config_name(c) for c in README_COMMANDS} == set(PAPER)


@pytest.mark.parametrize("command", README_COMMANDS)
def test_readme_command_composes(command):
    """Each README command's overrides apply to its config as written (no `+` needed,
    relative data paths, no hydra.run.dir); sweeps are checked with their first value."""
    words = readme.words(command, {"PATH": os.environ["PATH"], "USER_DIR": "/plugin", "r": "1"})
    assert words[words.index("--config-dir") + 1] == "examples/pretraining/config"
    overrides = [w.split(",")[0] if "," in w else w for w in words if "=" in w and not w.startswith("-")]
    assert not [o for o in overrides if o.startswith("hydra.")]
    cfg = load(readme.config_name(command), overrides)
    assert cfg.task.data == "manifests" and cfg.common.user_dir == "/plugin"
    if cfg.task.target_store is not None:
        assert cfg.task.target_store == "clap_targets"


def test_readme_runs_do_not_share_checkpoints():
    """Two different README commands never write to (and resume from) one checkpoint
    directory, except the online-teacher alternative to the same variant's store run."""
    seen = {}
    for command in README_COMMANDS:
        if " -m " in command:
            continue  # a sweep: one directory per job under multirun/
        words = readme.words(command, {"PATH": os.environ["PATH"], "USER_DIR": "/plugin", "r": "0"})
        save = next((w.split("=", 1)[1] for w in words if w.startswith("checkpoint.save_dir=")),
                    f"checkpoints/{readme.config_name(command)}")
        other = seen.setdefault(save, command)
        assert other == command or "teacher_checkpoint" in other + command, (save, other, command)
