#!/usr/bin/env python
"""Export the encoder of a checkpoint as a standalone encoder file (safetensors + JSON config).

    python examples/export_encoder.py outputs/demo/supmam/checkpoints/checkpoint_last.pt encoder.safetensors

CHECKPOINT: a pretraining or fine-tuning checkpoint of this plugin (fairseq layout), an
earlier export or a converted AudioMAE file. OUT ``X.safetensors`` writes the weights with
their config in the header metadata, and the same config as ``X.json``: the architecture,
the front end (sample rate, fbank options, target length, normalisation stats) and the
source checkpoint's sha256 (see ``mam_clap_plugin.checkpoint.export_config``). A ``.pt``
name writes the older torch export instead. Both load without fairseq, with
``mam_clap_plugin.load_encoder`` or as the s3prl upstream ``supmam_clap_local``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from mam_clap_plugin.checkpoint import CheckpointError, export_encoder


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining or fine-tuning checkpoint (fairseq layout), an earlier export "
                                      "or a converted AudioMAE file")
    p.add_argument("out", help="output file: X.safetensors (+ X.json), or X.pt for the older torch export")
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
