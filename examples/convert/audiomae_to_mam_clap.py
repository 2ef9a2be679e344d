#!/usr/bin/env python
"""Convert an AudioMAE checkpoint (pretrained or fine-tuned, AudioMAE's or timm's layout)
into this project's encoder export.

    python examples/convert/audiomae_to_mam_clap.py pretrained.pth audiomae.safetensors

IN: AudioMAE's released ``{'model': state_dict, ...}`` file, or the same weights in timm's
layout (a bare state dict, torch or ``.safetensors``). OUT, two forms:

* ``OUT.safetensors``: the encoder export, plus ``OUT.json`` (its config, for reading);
  a fine-tuned file keeps ``fc_norm.*`` and ``head.*`` in it;
* ``OUT.pt`` (any other name): the torch export (version 1), for encoders without a head;
  a fine-tuned file is refused there (exit status 1, the error names the file).

Either way the script prints the export's metadata as JSON on stdout and a one-line summary
on stderr. The output works wherever an encoder export does: ``mam_clap_plugin.load_encoder``,
the s3prl upstream's ``-k``, ``examples/extract_features.py --checkpoint``, pretraining's
``model.encoder_init``. The mapping is strict (see ``mam_clap_plugin.convert``): a mismatch
lists the missing and unexpected keys; decoder keys are listed as dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from mam_clap_plugin.checkpoint import CheckpointError
from mam_clap_plugin.convert import convert_audiomae


def group_keys(keys: List[str]) -> str:
    """``decoder_blocks.0.x, decoder_blocks.1.y, mask_token`` -> ``decoder_blocks.* (2), mask_token``."""
    groups: dict = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    return ", ".join(name if members == [name] else f"{name}.* ({len(members)})" for name, members in groups.items())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", metavar="IN", help="AudioMAE checkpoint (.pth) or timm-layout state dict")
    p.add_argument("output", metavar="OUT", help="encoder export to write (e.g. audiomae.safetensors)")
    p.add_argument("--norm-stats", default="audioset",
                   help="fbank stats the weights were trained with: audioset (AudioMAE's AudioSet models), "
                        "esc50, speech_commands or 'mean,std' (default: audioset)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (not stored in the weights; default width / 64: 12 for ViT-B)")
    p.add_argument("--trusted", action="store_true",
                   help="load IN with weights_only=False (only for files you trust)")
    args = p.parse_args(argv)
    try:
        meta = convert_audiomae(args.input, args.output, args.norm_stats, args.num_heads, args.trusted)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    dropped = meta["dropped"]  # also in a .safetensors export's source.dropped; a .pt keeps no such record
    head = meta["head"]
    print(json.dumps({**meta, "out": args.output, "size_mib": round(os.path.getsize(args.output) / 2**20, 3)},
                     indent=2))
    print(f"converted AudioMAE {meta['kind']} file {args.input} -> {args.output}: "
          f"{meta['encoder']['depth']} blocks, width {meta['encoder']['embed_dim']}, "
          f"{meta['encoder']['max_frames']} frames; "
          f"{'head ' + str(head['num_classes']) + ' classes kept' if head else 'no head'}; "
          f"dropped {len(dropped)} decoder keys{': ' + group_keys(dropped) if dropped else ''} "
          "(all listed in the JSON's dropped)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
