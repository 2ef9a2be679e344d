"""Let a checkpoint written with fairseq's ``adam`` resume under ``mam_clap_adamw``, keeping its moments.

fairseq's trainer loads a checkpoint's optimizer state only when the optimizer's class name
matches the saved one (``FairseqAdam`` against ``MamClapAdamW``; under ``common.fp16`` /
``common.bf16`` both are ``FP16Optimizer`` and nothing needs doing).
``MamClapAdamW.load_state_dict`` maps adam's one-group state onto its own groups, so only the
name needs changing. The original is kept as ``<checkpoint>.adam.bak``.

    python -m mam_clap_plugin.optim.adopt_adam checkpoints/mam/checkpoint_last.pt

The checkpoint is read with ``torch.load(weights_only=True)`` and the globals fairseq
checkpoints need (:func:`~mam_clap_plugin.files.fairseq_checkpoint_globals`), so no code from
the file runs; a file that pickles anything else is refused, naming what, unless ``--trusted``
is given. A checkpoint already relabelled is left as it is ("nothing to do"), so running the
command twice is harmless.

Why it lives in the runtime package: it is a user's command (``python -m ...`` from any
directory, with nothing but the installed package), and it belongs to the optimizer whose
state it prepares: :class:`~mam_clap_plugin.optim.mam_clap_adamw.MamClapAdamW` reads what it
writes, so the two change together.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from typing import List, Optional

from ..files import CheckpointError, atomic_write, fairseq_checkpoint_globals, read_torch_file, torch_save

SAVED_NAME = "FairseqAdam"
NEW_NAME = "MamClapAdamW"


def adopt_adam_checkpoint(path: str, trusted: bool = False) -> Optional[str]:
    """Relabel ``path``'s last optimizer-history entry; returns the backup's path, or None when
    the checkpoint already names ``MamClapAdamW`` (nothing to do).

    Raises CheckpointError (unreadable, or pickled objects outside the allow-list without
    ``trusted``) or ValueError (not a fairseq training checkpoint of fairseq's adam), naming ``path``.
    """
    state = read_torch_file(path, trusted, safe_globals=fairseq_checkpoint_globals(), trust_hint="--trusted")
    history = state.get("optimizer_history") if isinstance(state, dict) else None
    if not history:
        raise ValueError(f"{path}: not a fairseq training checkpoint (no optimizer_history)")
    name = history[-1].get("optimizer_name")
    if name == NEW_NAME:
        return None
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
    atomic_write(path, lambda tmp: torch_save(state, tmp))
    return backup


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="+", help="fairseq checkpoint(s) written with optimizer._name=adam")
    p.add_argument("--trusted", action="store_true",
                   help="load with weights_only=False: lets the file run code while it loads; only for files "
                        "you trust that hold more than fairseq checkpoints need")
    args = p.parse_args(argv)
    for path in args.checkpoint:
        try:
            backup = adopt_adam_checkpoint(path, args.trusted)
        except (CheckpointError, ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if backup is None:
            print(f"{path}: already relabelled for mam_clap_adamw ({NEW_NAME}); nothing to do")
        else:
            print(f"{path}: optimizer state relabelled for mam_clap_adamw (original kept as {backup})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
