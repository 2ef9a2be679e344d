#!/usr/bin/env python
"""Audio tagging: the top-k classes of each audio file from a fine-tuned checkpoint.

    python examples/predict.py FILE [FILE ...] --checkpoint CKPT [--top-k 5] [--json]
    python examples/predict.py FILE --checkpoint audiomae_as2m.safetensors --class-list-file classes.txt

Any length and sample rate (resampled to 16 kHz, channels averaged); long files are
scored by windows of the checkpoint's ``task.target_length`` frames, averaged. Scores are
probabilities: sigmoid per class for a multi-label (BCE) model, softmax for a
single-label (CE) one. The class names come from a fine-tuned checkpoint itself; an encoder
export that keeps a classifier head (a converted fine-tuned AudioMAE file) holds none, so
``--class-list-file`` gives them (AudioSet's 527 names, one per line, as
``examples/prepare/labels.py audioset`` writes ``classes.txt``).
"""
import argparse
import json
import sys

from mam_clap_plugin.checkpoint import CheckpointError
from mam_clap_plugin.data.audio import load_audio
from mam_clap_plugin.data.manifest import ManifestError
from mam_clap_plugin.inference import load_classifier, score_waveforms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="audio files (anything soundfile reads)")
    p.add_argument("--checkpoint", required=True,
                   help="fine-tuned checkpoint (checkpoint_best.pt) or an encoder export with a head")
    p.add_argument("--class-list-file", default=None,
                   help="class names, one per line (required for an encoder export; checked against a checkpoint's)")
    p.add_argument("--top-k", type=int, default=5, help="classes to list per file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        clf = load_classifier(args.checkpoint, args.class_list_file)
    except (CheckpointError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    names = clf.class_names
    results = []
    for path in args.files:
        scores = score_waveforms(clf, [load_audio(path)])[0]
        top = scores.argsort()[::-1][: args.top_k]
        results.append({"file": path, "top": [{"class": names[i], "score": float(scores[i])} for i in top]})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    width = max(len(r["file"]) for r in results)
    print(f"{'file':<{width}}  rank  {'score':>6}  class")
    for r in results:
        for rank, t in enumerate(r["top"], start=1):
            print(f"{r['file'] if rank == 1 else '':<{width}}  {rank:>4}  {t['score']:6.3f}  {t['class']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
