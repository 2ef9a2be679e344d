#!/usr/bin/env python
"""Export the encoder of a checkpoint as a standalone encoder file (safetensors + JSON config)
or as a Hugging Face folder.

    python examples/export_encoder.py outputs/demo/supmam/checkpoints/checkpoint_last.pt encoder.safetensors
    python examples/export_encoder.py outputs/demo/supmam/checkpoints/checkpoint_last.pt mam-clap-encoder --hub

CHECKPOINT: a pretraining or fine-tuning checkpoint of this plugin (fairseq layout), an
earlier export, a Hugging Face folder or a converted AudioMAE file. OUT ``X.safetensors``
writes the weights with their config in the header metadata, and the same config as
``X.json``: the architecture, the front end (sample rate, fbank options, target length,
normalisation stats) and the source checkpoint's sha256 (see
``mam_clap_plugin.checkpoint.export_config``). A ``.pt`` name writes the older torch export
instead. ``--hub`` makes OUT a Hugging Face folder (``mam_clap_plugin.hub.MamClapEncoder``):
``config.json`` (the same config), ``model.safetensors`` and a model card ``README.md``; load
it with ``MamClapEncoder.from_pretrained(OUT)`` or push it with ``push_to_hub``. All of them
load without fairseq, with ``mam_clap_plugin.load_encoder`` or as the s3prl upstream
``supmam_clap_local``.
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
    p.add_argument("checkpoint", help="pretraining or fine-tuning checkpoint (fairseq layout), an earlier export, "
                                      "a Hugging Face folder or a converted AudioMAE file")
    p.add_argument("out", help="output file: X.safetensors (+ X.json), or X.pt for the older torch export; "
                               "with --hub, the output folder")
    p.add_argument("--hub", action="store_true",
                   help="write OUT as a Hugging Face folder: config.json, model.safetensors, README.md (model card)")
    p.add_argument("--repo-id", default=None,
                   help="with --hub: the Hub id (user/name) the model card's loading example names")
    p.add_argument("--trusted", action="store_true",
                   help="load the checkpoint with weights_only=False (only for files you trust)")
    args = p.parse_args(argv)
    if args.repo_id and not args.hub:
        p.error("--repo-id goes with --hub")
    try:
        if args.hub:
            from mam_clap_plugin.hub import export_hub_folder

            meta = export_hub_folder(args.checkpoint, args.out, trusted=args.trusted, repo_id=args.repo_id)
        else:
            meta = export_encoder(args.checkpoint, args.out, trusted=args.trusted)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.hub:
        files = {name: round(os.path.getsize(os.path.join(args.out, name)) / 2**20, 3)
                 for name in sorted(os.listdir(args.out))}
        print(json.dumps({**meta, "out": args.out, "files_mib": files}, indent=2))
    else:
        size_mib = os.path.getsize(args.out) / 2**20
        print(json.dumps({**meta, "out": args.out, "size_mib": round(size_mib, 3)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
