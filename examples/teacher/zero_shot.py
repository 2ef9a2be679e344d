#!/usr/bin/env python
"""Zero-shot classification and retrieval with a caption teacher's two towers.

    python examples/teacher/zero_shot.py CKPT DATA SPLIT [--template "the sound of {}" ...]
        [--retrieval] [--json OUT.json] [--batch-size 16] [--num-workers 2] [--device cpu|cuda]
        [--labels lbl] [--captions cap] [--class-list classes.txt] [--trusted] [--no-progress]

CKPT is a CLAP teacher trained with ``examples/teacher`` (any checkpoint the teacher registry
reads as one with a text tower). Classification: each class name of ``DATA/classes.txt`` is put
into every ``--template`` (several allowed: their caption embeddings are averaged, as CLIP does;
default "the sound of {}", "a recording of {}", "an audio clip of {}", "we hear {}"); each clip
of ``DATA/SPLIT.tsv`` is scored by the cosine similarity of its embedding with each class's, and
compared with ``DATA/SPLIT.lbl``: accuracy (top-1) for single-label data, mAP (macro average
precision) for multi-label data, each next to a random scorer's. ``--retrieval``: audio->text
and text->audio recall@1/5/10 with the first caption of each line of ``DATA/SPLIT.cap``
(identical captions count as one; see ``mam_clap_plugin.metrics.retrieval_metrics``), next to
chance. Each clip is its first ``clip_seconds`` at the model's rate.

Writes a JSON report (default ``CKPT_DIR/zero_shot_SPLIT.json``); the last line printed is
``accuracy X`` (single-label) or ``mAP X`` (multi-label), in percent, or ``mean_recall X``
with ``--retrieval`` on a split without labels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mam_clap_plugin.data.audio import AudioError, TeacherInputs
from mam_clap_plugin.data.captions import DEFAULT_TEMPLATES, check_templates, label_text, read_captions, split_captions
from mam_clap_plugin.data.manifest import ManifestError, multi_hot, read_class_list, read_labels, read_manifest
from mam_clap_plugin.metrics import classification_metrics, retrieval_metrics
from mam_clap_plugin.teacher.caption import load_caption_clap
from mam_clap_plugin.teacher.clap import ClapCheckpointError, read_teacher_file
from mam_clap_plugin.teacher.registry import detect_format


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("checkpoint", help="caption teacher checkpoint (examples/teacher: checkpoint_best.pt)")
    p.add_argument("data", help="directory with SPLIT.tsv, SPLIT.lbl, classes.txt (and SPLIT.cap for --retrieval)")
    p.add_argument("split", help="split name, e.g. valid")
    p.add_argument("--template", action="append", help="prompt template with one {} for the class name "
                   "(repeatable, averaged; default: " + "; ".join(repr(t) for t in DEFAULT_TEMPLATES) + ")")
    p.add_argument("--retrieval", action="store_true", help="also audio<->text recall@1/5/10 on SPLIT.cap")
    p.add_argument("--json", help="report path (default: CKPT_DIR/zero_shot_SPLIT.json)")
    p.add_argument("--labels", default="lbl", help="label file extension (SPLIT.EXT)")
    p.add_argument("--captions", default="cap", help="caption file extension (SPLIT.EXT)")
    p.add_argument("--class-list", default="classes.txt", help="class list inside DATA")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2, help="audio-loading worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trusted", action="store_true", help="allow a full unpickle of the checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        args.template = check_templates(args.template or DEFAULT_TEMPLATES)
    except ValueError as err:
        p.error(str(err))
    return args


def load_model(path: str, trusted: bool):
    """The caption CLAP model of ``path``; a clear error for a checkpoint without a text tower we read."""
    checkpoint = read_teacher_file(path, trusted, what="teacher checkpoint")
    fmt = detect_format(path, checkpoint)
    if fmt is not None and fmt.name != "caption-clap":
        raise ClapCheckpointError(
            f"{path}: a {fmt.name} checkpoint, whose text tower this project does not read (LAION-CLAP's RoBERTa and "
            "MS-CLAP's GPT-2 are not implemented here): zero-shot classification and retrieval need a caption "
            "teacher trained with examples/teacher. Its audio tower still serves as a teacher "
            "(extract_clap_targets.py, task.teacher_checkpoint).")
    return load_caption_clap(path, checkpoint=checkpoint)


@torch.no_grad()
def audio_embeddings(model, manifest, args) -> np.ndarray:
    """(N, E) normalised clip embeddings, in manifest order."""
    inputs = TeacherInputs(manifest, np.arange(len(manifest)), model.cfg.sample_rate, model.num_samples)
    loader = DataLoader(inputs, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=list)
    out = np.zeros((len(manifest), model.cfg.embed_dim), dtype=np.float32)
    with tqdm(total=len(manifest), unit="clip", desc=f"{args.split} audio", disable=args.no_progress) as bar:
        for items in loader:
            errors = [err for _, _, err in items if err is not None]
            if errors:
                raise AudioError(errors[0])
            wav = torch.stack([w for _, w, _ in items]).to(args.device)
            out[[i for i, _, _ in items]] = model.encode_audio(wav).cpu().numpy()
            bar.update(len(items))
    return out


@torch.no_grad()
def text_embeddings(model, texts: list[str], batch_size: int) -> np.ndarray:
    return np.concatenate([model.encode_text(texts[i:i + batch_size]).cpu().numpy()
                           for i in range(0, len(texts), batch_size)])


def class_embeddings(model, names: list[str], templates: list[str], batch_size: int) -> np.ndarray:
    """(K, E): per class, the normalised mean of its normalised prompt embeddings (CLIP's prompt ensemble)."""
    prompts = [t.format(label_text([n])) for n in names for t in templates]
    emb = text_embeddings(model, prompts, batch_size).reshape(len(names), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    model = load_model(args.checkpoint, args.trusted).to(args.device)
    manifest = read_manifest(os.path.join(args.data, f"{args.split}.tsv"))
    label_path = os.path.join(args.data, f"{args.split}.{args.labels}")
    if not os.path.isfile(label_path) and not args.retrieval:
        raise ManifestError(f"{label_path}: label file not found (zero-shot classification scores a labelled split; "
                            "--retrieval alone needs captions only)")
    captions = None
    if args.retrieval:
        lines = read_captions(os.path.join(args.data, f"{args.split}.{args.captions}"), len(manifest), manifest.path)
        captions = [split_captions(line, "")[0] for line in lines]
    audio = audio_embeddings(model, manifest, args)
    report = {"checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(args.data), "split": args.split,
              "num_clips": len(manifest)}
    last = None
    if os.path.isfile(label_path):
        names = read_class_list(os.path.join(args.data, args.class_list))
        target = multi_hot(read_labels(label_path, len(manifest), len(names)), len(names))
        scores = audio @ class_embeddings(model, names, args.template, args.batch_size).T
        res = classification_metrics(scores, target)
        multi = bool((target.sum(axis=1) > 1).any())
        present = target[:, target.any(axis=0)]
        report["classification"] = {
            "templates": args.template, "num_classes": len(names), "multi_label": multi,
            "accuracy": res.accuracy, "mAP": res.mAP, "classes_left_out": res.left_out,
            "chance": {"accuracy": 100.0 * float(target.sum(axis=1).mean()) / len(names),
                       "mAP": 100.0 * float(present.mean(axis=0).mean())},
        }
        last = ("mAP", res.mAP) if multi else ("accuracy", res.accuracy)
        print(f"{args.split}: zero-shot accuracy {res.accuracy:.2f} (chance "
              f"{report['classification']['chance']['accuracy']:.2f}), mAP {res.mAP:.2f} (chance "
              f"{report['classification']['chance']['mAP']:.2f}), {len(names)} classes, {len(manifest)} clips")
    if captions is not None:
        ret = retrieval_metrics(audio, text_embeddings(model, captions, args.batch_size), captions)
        report["retrieval"] = {"recall": ret.recall, "chance": ret.chance, "mean_recall": ret.mean_recall,
                               "num_clips": ret.num_clips, "num_captions": ret.num_captions}
        print(f"{args.split}: retrieval ({ret.num_captions} distinct captions) "
              + ", ".join(f"{k} {v:.1f} (chance {ret.chance[k]:.1f})" for k, v in ret.recall.items()))
        last = last or ("mean_recall", ret.mean_recall)
    report["seconds"] = round(time.time() - start, 2)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"zero_shot_{args.split}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"report: {path}")
    print(f"{last[0]} {last[1]:.2f}", flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except (ClapCheckpointError, ManifestError, AudioError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
