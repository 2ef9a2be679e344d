#!/usr/bin/env python
"""Train the caption teacher's sentencepiece tokenizer on the training captions.

    python examples/teacher/train_tokenizer.py DATA --vocab-size N [--split train] [--ext cap]
        [--model-type unigram|bpe|char|word] [--out DATA/spm.model]

Reads every caption of ``DATA/{split}.{ext}`` (several per line, separated by `` ||| ``) and
writes ``DATA/spm.model`` (and ``spm.vocab``), the file the ``clap_teacher`` task reads by
default (``task.tokenizer``). Ids: unk 0, bos 1, eos 2, no padding id. On a small caption set
the vocabulary is smaller than asked (no hard limit: sentencepiece stops where the captions end);
the size reached is printed. Prints one JSON line: ``{"model", "vocab_size", "asked", "captions"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from mam_clap_plugin.data.captions import read_caption_lines, split_captions
from mam_clap_plugin.data.manifest import ManifestError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("data", help="directory with {split}.cap")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size to aim for (a maximum)")
    p.add_argument("--split", default="train", help="split whose captions train it")
    p.add_argument("--ext", default="cap", help="caption file extension: {split}.EXT")
    p.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    p.add_argument("--out", help="model file (default DATA/spm.model; the .vocab goes next to it)")
    args = p.parse_args(argv)
    if args.vocab_size < 8:
        p.error("--vocab-size must be >= 8")
    return args


def read_all_captions(path: str) -> list[str]:
    """Every caption of every line of ``path``, each line checked."""
    lines = read_caption_lines(path)
    return [c for i, line in enumerate(lines, start=1) for c in split_captions(line, f"{path}:{i}")]


def main(argv=None) -> dict:
    import sentencepiece

    args = parse_args(argv)
    captions = read_all_captions(os.path.join(args.data, f"{args.split}.{args.ext}"))
    out = args.out or os.path.join(args.data, "spm.model")
    if not out.endswith(".model"):
        raise ValueError(f"--out {out}: the model file must end in .model")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "captions.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.writelines(c + "\n" for c in captions)
        try:
            sentencepiece.SentencePieceTrainer.train(
                input=text, model_prefix=out[: -len(".model")], vocab_size=args.vocab_size,
                model_type=args.model_type, character_coverage=1.0, hard_vocab_limit=False,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        except RuntimeError as err:
            raise ValueError(f"sentencepiece could not train on {len(captions)} captions with --vocab-size "
                             f"{args.vocab_size}: {str(err).splitlines()[0]}") from err
    vocab = sentencepiece.SentencePieceProcessor(model_file=out).get_piece_size()
    if vocab < args.vocab_size:
        print(f"note: the captions gave a vocabulary of {vocab} pieces (asked for {args.vocab_size})", file=sys.stderr)
    result = {"model": out, "vocab_size": vocab, "asked": args.vocab_size, "captions": len(captions)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ManifestError, ValueError) as err:
        sys.exit(f"error: {err}")
