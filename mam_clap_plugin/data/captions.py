"""Caption files of the caption teacher (``clap_teacher`` task): reading, writing, captions from labels.

``{split}.cap`` goes with the manifest ``{split}.tsv``, line by line (line ``i`` of the caption file
captions manifest entry ``i``, i.e. manifest line ``i + 1``): one or more captions per line,
separated by `` ||| ``, none empty. Training draws one of a clip's captions per epoch (the same
for a given seed, epoch and clip, whatever the number of processes or workers); validation uses the
first (:class:`~.caption_dataset.CaptionDataset`). Errors are :class:`~.manifest.ManifestError` s
naming ``file:line``. Nothing here imports fairseq or torch.
"""
from __future__ import annotations

import os

import numpy as np

from .manifest import ManifestError, PackedRows

#: What separates the captions of one clip on a line.
SEPARATOR = " ||| "
#: Templates that turn a clip's labels into captions (``examples/teacher/captions.py``) and class
#: names into zero-shot prompts (``examples/teacher/zero_shot.py``), when none are given.
DEFAULT_TEMPLATES = ("the sound of {}", "a recording of {}", "an audio clip of {}", "we hear {}")


def label_text(names: list[str]) -> str:
    """Class names as one phrase: ``a``; ``a and b``; ``a, b and c`` (underscores become spaces)."""
    names = [n.replace("_", " ").strip() for n in names]
    if not names or not all(names):
        raise ValueError(f"need non-empty class names, got {names!r}")
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_templates(templates) -> list[str]:
    """The templates, each checked to hold exactly one ``{}``; ValueError otherwise."""
    templates = list(templates)
    for t in templates:
        if t.count("{}") != 1 or not t.strip():
            raise ValueError(f"template {t!r} must hold exactly one '{{}}' (where the label goes)")
    if not templates:
        raise ValueError("no templates")
    return templates


def caption_rows(labels, class_names: list[str], templates=DEFAULT_TEMPLATES, per_clip: int = 0,
                 seed: int = 0) -> list[list[str]]:
    """Captions of each clip from its class ids: every template (or ``per_clip`` of them) filled with
    the clip's :func:`label_text`, in an order drawn per clip (seed, clip index), so that the first
    caption, the one validation uses, varies from clip to clip."""
    templates = check_templates(templates)
    keep = len(templates) if per_clip <= 0 else min(per_clip, len(templates))
    rows = []
    for i, ids in enumerate(labels):
        phrase = label_text([class_names[int(c)] for c in ids])
        order = np.random.default_rng((seed, i)).permutation(len(templates))[:keep]
        rows.append([templates[j].format(phrase) for j in order])
    return rows


def split_captions(line: str, where: str) -> list[str]:
    """The captions of one ``.cap`` line (``where`` = ``file:line`` for errors)."""
    captions = [c.strip() for c in line.split(SEPARATOR.strip())]
    for k, caption in enumerate(captions, start=1):
        if not caption:
            raise ManifestError(f"{where}: empty caption (caption {k} of {len(captions)} on the line; captions are "
                                f"separated by {SEPARATOR!r})")
    return captions


def read_caption_lines(path: str) -> list[str]:
    """The lines of a caption file, unchecked; ManifestError when it does not exist."""
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: caption file not found (one line of captions per manifest entry; "
                            "examples/teacher/captions.py writes one from labels)")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def read_captions(path: str, num_entries: int, manifest_path: str = "the manifest") -> PackedRows:
    """Read and check ``{split}.cap`` for a manifest of ``num_entries`` clips; returns its lines
    (packed, split with :func:`split_captions` on use)."""
    lines = read_caption_lines(path)
    if len(lines) != num_entries:
        raise ManifestError(f"{path}: caption file has {len(lines)} lines but {manifest_path} has {num_entries} "
                            "entries (one caption line per manifest entry, same order)")
    for lineno, line in enumerate(lines, start=1):
        split_captions(line, f"{path}:{lineno}")
    return PackedRows.of_strings(lines)


def write_captions(path: str, rows: list[list[str]]) -> None:
    """Write ``{split}.cap``: each row's captions on one line, joined by :data:`SEPARATOR`."""
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            if not row or any(not c.strip() or "\n" in c or SEPARATOR.strip() in c for c in row):
                raise ValueError(f"{path}: entry #{i} has no caption, an empty one, or a newline or '|||' in one: "
                                 f"{row!r}")
            f.write(SEPARATOR.join(c.strip() for c in row) + "\n")
