"""Builders shared by several test modules: the configs on disk, tiny fine-tuning configs and a
pretraining checkpoint written in-process, fairseq optimizer configs, and the port and process
handling of the 2-process runs."""
import os
import signal
import socket
import time

import pytest
import torch
from fairseq import optim
from fairseq.dataclass.configs import FairseqConfig
from fairseq.optim.adam import FairseqAdamConfig
from fairseq.optim.lr_scheduler.cosine_lr_scheduler import CosineLRScheduleConfig
from omegaconf import OmegaConf

import mam_clap_plugin  # noqa: F401  (registers the plugin's components: mam_clap_adamw, the models)
from mam_clap_plugin.modules.encoder import AudioEncoder
from mam_clap_plugin.optim.mam_clap_adamw import MamClapAdamWConfig
from mam_clap_plugin.tasks.mam_clap_finetuning import MamClapFinetuningConfig

from .conftest import REPO

# ---------------------------------------------------------------- the configs on disk


def config_names(config_dir: str) -> list:
    """The configs a user can name with ``--config-name`` in ``config_dir``: every top-level YAML
    file but ``base.yaml`` (which they all extend), sorted; the parametrisation of the config tests,
    so a new file is tested by being added."""
    return sorted(name[:-len(".yaml")] for name in os.listdir(config_dir)
                  if name.endswith(".yaml") and name != "base.yaml")


def expectation(table: dict, name: str, config_dir: str, where: str):
    """``table[name]``, or a failure that says which file lacks expected values and where to add them."""
    if name not in table:
        path = os.path.relpath(os.path.join(config_dir, f"{name}.yaml"), REPO)
        pytest.fail(f"{path} has no expected values: add a '{name}' row to {where}", pytrace=False)
    return table[name]


# ---------------------------------------------------------------- fine-tuning

#: The tiny encoder of the in-process fine-tuning tests.
TINY = dict(encoder_embed_dim=32, encoder_layers=2, encoder_attention_heads=4, mlp_ratio=4.0, max_frames=1024)


def task_cfg(data, **kw):
    """A ``mam_clap_finetuning`` task config on ``data`` (64 frames, seed 1)."""
    values = dict(data=data, target_length=64, train_subset="train", seed=1)
    values.update(kw)
    return OmegaConf.structured(MamClapFinetuningConfig(**values))


def model_cfg(**kw):
    """A ``mam_clap_classifier`` model config with the :data:`TINY` encoder."""
    values = {"_name": "mam_clap_classifier", **TINY, "drop_path": 0.1}
    values.update(kw)
    return OmegaConf.create(values)


def save_pretraining_checkpoint(path, max_frames=1024, seed=0):
    """A tiny supmam_clap checkpoint in fairseq's saved layout (cfg as plain dicts)."""
    torch.manual_seed(seed)
    cfg = {"_name": "supmam_clap", **TINY, "max_frames": max_frames}
    encoder = AudioEncoder.from_model_config(cfg)
    state = {"args": None, "cfg": {"model": cfg, "task": {"_name": "mam_clap_pretraining", "target_length": 1024}},
             "model": {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                       "decoder.embed.weight": torch.zeros(4, 32)}}
    torch.save(state, path)
    return encoder


# ---------------------------------------------------------------- fairseq optimizers

LR = 1e-3
WD = 0.05


def full_cfg(optimizer="mam_clap_adamw", weight_decay=WD, **common):
    """A fairseq config with the optimizer and a cosine schedule (4 warmup updates of 20)."""
    cfg = OmegaConf.structured(FairseqConfig())
    dc = MamClapAdamWConfig if optimizer == "mam_clap_adamw" else FairseqAdamConfig
    cfg.optimizer = OmegaConf.structured(dc(weight_decay=weight_decay, adam_betas="(0.9,0.95)"))
    cfg.optimizer._name = optimizer
    cfg.lr_scheduler = OmegaConf.structured(CosineLRScheduleConfig(warmup_updates=4, warmup_init_lr=1e-7))
    cfg.lr_scheduler._name = "cosine"
    cfg.optimization.lr = [LR]
    cfg.optimization.max_update = 20
    for key, value in common.items():
        cfg.common[key] = value
    return cfg


def build(cfg, model):
    """fairseq's optimizer for ``model``'s trainable parameters (its fp16/bf16 wrapper when asked)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.common.fp16 or cfg.common.bf16:
        return optim.FP16Optimizer.build_optimizer(cfg, params)
    return optim.build_optimizer(cfg.optimizer, params)


def blocking_imports(*packages: str) -> str:
    """Python source that makes importing any of ``packages`` raise ImportError, for the first
    lines of a ``python -c`` program that must run without them (fairseq, s3prl, ...)."""
    return (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {tuple(packages)!r}: raise ImportError(name + ' blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
    )



# ---------------------------------------------------------------- 2-process runs


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs, logs, timeout=300):
    """Wait for every process (started with ``start_new_session=True``), killing the process
    groups of all of them when one fails or time runs out; [(returncode, log text)]."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.3)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(p.returncode, open(log).read()) for p, log in zip(procs, logs)]
