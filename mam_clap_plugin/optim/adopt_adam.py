"""Let a checkpoint written with fairseq's ``adam`` resume under ``mam_clap_adamw``, keeping its moments.

fairseq's trainer loads a checkpoint's optimizer state only when the optimizer's class name
matches the saved one (``FairseqAdam`` against ``MamClapAdamW``; under ``common.fp16`` /
``common.bf16`` both are ``FP16Optimizer`` and nothing needs doing).
``MamClapAdamW.load_state_dict`` maps adam's one-group state onto its own groups, so only the
name needs changing. The original is kept as ``<checkpoint>.adam.bak``.

    python -m mam_clap_plugin.optim.adopt_adam checkpoints/mam/checkpoint_last.pt

Why it lives in the runtime package: it is a user's command (``python -m ...`` from any
directory, with nothing but the installed package), and it belongs to the optimizer whose
state it prepares: :class:`~mam_clap_plugin.optim.mam_clap_adamw.MamClapAdamW` reads what it
writes, so the two change together.
"""
from __future__ import annotations

import argparse
import os
import shutil
from typing import List, Optional

import torch

SAVED_NAME = "FairseqAdam"
NEW_NAME = "MamClapAdamW"


def adopt_adam_checkpoint(path: str) -> str:
    """Relabel ``path``'s last optimizer-history entry; returns the backup's path."""
    # a fairseq training checkpoint holds its config objects: it is this user's own file
    state = torch.load(path, map_location="cpu", weights_only=False)
    history = state.get("optimizer_history") if isinstance(state, dict) else None
    if not history:
        raise ValueError(f"{path}: not a fairseq training checkpoint (no optimizer_history)")
    name = history[-1].get("optimizer_name")
    if name == NEW_NAME:
        raise ValueError(f"{path}: already written by {NEW_NAME}")
    if name != SAVED_NAME:
        raise ValueError(
            f"{path}: its optimizer state is from {name}, not fairseq's adam ({SAVED_NAME}); resume with "
            "checkpoint.reset_optimizer=true instead"
        )
    if state.get("last_optimizer_state") is None:
        raise ValueError(f"{path}: holds no optimizer state (saved with checkpoint.no_save_optimizer_state?)")
    backup = path + ".adam.bak"
    shutil.copy2(path, backup)
    history[-1]["optimizer_name"] = NEW_NAME
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return backup


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="+", help="fairseq checkpoint(s) written with optimizer._name=adam")
    args = p.parse_args(argv)
    for path in args.checkpoint:
        backup = adopt_adam_checkpoint(path)
        print(f"{path}: optimizer state relabelled for mam_clap_adamw (original kept as {backup})")


if __name__ == "__main__":
    main()
