#!/usr/bin/env python
"""Export the encoder of a SupMAM-CLAP pretraining checkpoint as an encoder-only file.

    python examples/export_encoder.py outputs/demo/supmam/checkpoints/checkpoint_last.pt encoder.pt

The output holds the encoder's constructor arguments, its weights and the fbank
normalisation stats of its pretraining (see ``mam_clap_plugin.checkpoint.export_encoder``).
It loads with ``torch.load(..., weights_only=True)`` and without fairseq, e.g. as the s3prl
upstream ``supmam_clap_local`` (``upstream/hubconf.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

# Run as a script, examples/ is on sys.path; put the repository root first so this
# checkout's mam_clap_plugin is the one imported.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mam_clap_plugin.checkpoint import CheckpointError, export_encoder  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining checkpoint (fairseq layout) or an earlier export")
    p.add_argument("out", help="output file (e.g. encoder.pt)")
    p.add_argument("--trusted", action="store_true",
                   help="load the checkpoint with weights_only=False (only for files you trust)")
    args = p.parse_args(argv)
    try:
        meta = export_encoder(args.checkpoint, args.out, trusted=args.trusted)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size_mib = os.path.getsize(args.out) / 2**20
    print(json.dumps({**meta, "out": args.out, "size_mib": round(size_mib, 3)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
