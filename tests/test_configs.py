"""The four paper configs: every plugin field is listed (so any can be overridden on the
command line without `+`), and the variant settings are the paper's."""
import dataclasses

import fairseq  # noqa: F401  (registers the plugin's components)
import pytest
from omegaconf import OmegaConf

import mam_clap_plugin  # noqa: F401
from mam_clap_plugin.criterions.supmam_clap import SupMamClapCriterionConfig
from mam_clap_plugin.models.supmam_clap import SupMamClapConfig
from mam_clap_plugin.tasks.mam_clap_pretraining import MamClapPretrainingConfig

from .conftest import CONFIG_DIR

PAPER = {  # variant: (mask ratio, target, classification branch, lambda_cls, decoder blocks)
    "mam": (0.8, "pixel", False, 0.0, 16),
    "mam_clap": (0.2, "clap", False, 0.0, 1),
    "supmam": (0.4, "pixel", True, 0.01, 16),
    "supmam_clap": (0.2, "clap", True, 1e-4, 1),
}


def load(name):
    return OmegaConf.load(f"{CONFIG_DIR}/{name}.yaml")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_every_field_is_listed(name):
    cfg = load(name)
    for section, dc in (("task", MamClapPretrainingConfig), ("model", SupMamClapConfig),
                        ("criterion", SupMamClapCriterionConfig)):
        fields = {f.name for f in dataclasses.fields(dc) if not f.name.startswith("_")}
        listed = set(cfg[section].keys()) - {"_name"}
        assert listed == fields, (section, fields ^ listed)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings(name):
    cfg = load(name)
    ratio, target, branch, lam, dec = PAPER[name]
    m = cfg.model
    assert (m.mask_ratio, m.target, m.classification_branch, cfg.criterion.lambda_cls, m.decoder_layers) == (
        ratio, target, branch, lam, dec)
    # ViT-B encoder, AdamW at 2e-4, total batch 128, AudioMAE's 4x4 window shifted by 2 in time
    assert (m.encoder_embed_dim, m.encoder_layers, m.encoder_attention_heads) == (768, 12, 12)
    assert cfg.optimizer._name == "mam_clap_adamw" and cfg.optimization.lr == [0.0002]
    assert cfg.dataset.batch_size * cfg.optimization.update_freq[0] == 128
    assert (m.decoder_window_time, m.decoder_window_freq, m.decoder_shift_time, m.decoder_shift_freq) == (4, 4, 2, 0)
    assert (cfg.task.labels is not None) == branch
    # teacher targets are chosen on the command line (offline store or online teacher);
    # the configs fix the paper's teacher map: LAION-CLAP's final map, no projection
    assert cfg.task.target_store is None and cfg.task.teacher_checkpoint is None
    assert cfg.task.teacher_layer == "final" and cfg.task.teacher_projection is False
