"""Run ``fairseq-hydra-train`` with this plugin, compose its configs, and read its JSON logs.

Used by the demo, the benchmarks' smoke runs and the integration tests, so that all of
them launch training exactly as a user does on the command line.

Why it lives in the runtime package: its users are ``examples/`` scripts that users run
(``esc50_cv.py`` trains one fine-tuning run per fold, ``run_demo.py`` the demo's runs),
``benchmarks/`` and ``tests/``. Scripts share code through installed modules only (never
``sys.path`` edits), and ``mam_clap_plugin`` is the package they all have installed. It
imports nothing from fairseq at import time, so the package stays light.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

_LOG_LINE = re.compile(r"\]\[(?P<tag>[\w.]+)\]\[INFO\] - (?P<json>\{.*\})\s*$")


def plugin_dir() -> str:
    """The ``common.user_dir`` to pass to fairseq: this package's directory."""
    return os.path.dirname(os.path.abspath(__file__))


def hydra_train_executable() -> str:
    """``fairseq-hydra-train`` of the running interpreter's environment."""
    local = os.path.join(os.path.dirname(sys.executable), "fairseq-hydra-train")
    found = local if os.path.exists(local) else shutil.which("fairseq-hydra-train")
    if not found:
        raise FileNotFoundError("fairseq-hydra-train not found: install ve-fairseq (see README, Installation)")
    return found


def compose_config(config_dir: str, config_name: str, overrides: Sequence[str] = ()):
    """The config ``fairseq-hydra-train --config-dir D --config-name N OVERRIDES`` would run
    with, composed without running it: Hydra's compose API, with fairseq's schema registered
    under the config name as the CLI does (so base.yaml, ``+size=...`` and every override
    apply the same way). ``${hydra:...}`` values (checkpoint.save_dir) stay unresolved.
    """
    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose, initialize_config_dir

    hydra_init(config_name)
    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def parse_json_log(text: str) -> Dict[str, List[dict]]:
    """Group fairseq's ``common.log_format=json`` records by tag.

    Returns e.g. ``{"train_inner": [...], "valid": [...], "train": [...]}``; numeric
    strings become floats.
    """
    records: Dict[str, List[dict]] = {}
    for line in text.splitlines():
        m = _LOG_LINE.search(line)
        if m:
            try:
                record = json.loads(m.group("json"))
            except json.JSONDecodeError:
                continue
            records.setdefault(m.group("tag"), []).append({k: _number(v) for k, v in record.items()})
    return records


@dataclass
class TrainRun:
    """Outcome of one ``fairseq-hydra-train`` call."""

    returncode: int
    log_path: str
    text: str
    records: Dict[str, List[dict]] = field(default_factory=dict)

    def losses(self) -> List[float]:
        """Training loss of every logged ``train_inner`` record, in order."""
        return [r["loss"] for r in self.records.get("train_inner", [])]


def run_hydra_train(
    config_dir: str,
    config_name: str,
    overrides: Sequence[str],
    run_dir: str,
    env: Optional[dict] = None,
    echo: bool = False,
    check: bool = True,
) -> TrainRun:
    """Run ``fairseq-hydra-train --config-dir D --config-name N OVERRIDES`` with ``run_dir``
    as the working directory, as a user does from a shell there.

    Adds only ``common.user_dir``: the configs themselves keep the job in the working
    directory (see examples/pretraining/config/base.yaml), so relative paths in
    ``overrides`` resolve against ``run_dir``, checkpoints go to
    ``run_dir/checkpoints/<config name>`` unless ``checkpoint.save_dir`` is given, and the
    same call again resumes. The full output goes to ``run_dir/train.log`` (and to stdout
    when ``echo``). With ``check``, a failed run raises RuntimeError carrying the end of the log.
    """
    os.makedirs(run_dir, exist_ok=True)
    cmd = [
        hydra_train_executable(),
        "--config-dir",
        os.path.abspath(config_dir),
        "--config-name",
        config_name,
        *overrides,
        f"common.user_dir={plugin_dir()}",
    ]
    log_path = os.path.join(run_dir, "train.log")
    lines = []
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=run_dir, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
    text = "".join(lines)
    run = TrainRun(proc.returncode, log_path, text, parse_json_log(text))
    if check and proc.returncode != 0:
        tail = "".join(lines[-40:])
        raise RuntimeError(f"fairseq-hydra-train failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return run
