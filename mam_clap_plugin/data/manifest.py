"""Manifest, class-list and label files.

* ``{split}.tsv`` -- fairseq wav2vec manifest: the first line is the root directory, then one
  ``relpath<TAB>num_samples`` line per clip (``num_samples`` at the file's native rate).
* ``classes.txt`` -- one class name per line; the class id is the 0-based line index.
* ``{split}.lbl`` -- one line per manifest entry (same order): comma-separated class ids,
  at least one per line (multi-label allowed), e.g. ``0,17,243``.

Every error is a ``ManifestError`` (a ValueError) whose message starts with ``file:line``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


class ManifestError(ValueError):
    """A manifest, class list or label file is malformed; the message names file:line."""


@dataclass
class Manifest:
    """A parsed ``{split}.tsv``.

    Attributes:
        root: directory the relative paths are relative to (first line of the file).
        paths: relative audio paths, one per entry.
        sizes: number of samples of each file at its native rate.
        path: the manifest file itself.
    """

    root: str
    paths: list[str]
    sizes: list[int]
    path: str

    def __len__(self) -> int:
        return len(self.paths)

    def full_path(self, i: int) -> str:
        """Absolute (root-joined) path of entry ``i``."""
        return os.path.join(self.root, self.paths[i])

    def where(self, i: int) -> str:
        """``"file:line"`` of entry ``i`` (1-based line; the root is line 1)."""
        return f"{self.path}:{i + 2}"


def find_audio(root: str, extensions: set[str]) -> list[str]:
    """Relative paths (posix separators) of files under ``root`` with these extensions
    (lower case, no dot), sorted."""
    found = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            if os.path.splitext(name)[1].lower().lstrip(".") in extensions:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _read_lines(path: str, what: str) -> list[str]:
    """Lines of a text file without their line endings; ManifestError if it is missing."""
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: {what} file not found")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def _parse_entry(line: str, where: str) -> tuple[str, int]:
    """Parse one ``relpath<TAB>num_samples`` manifest line."""
    fields = line.split("\t")
    if len(fields) != 2 or not fields[0]:
        raise ManifestError(
            f"{where}: expected 'relpath<TAB>num_samples' (2 tab-separated fields), got {line!r}"
        )
    try:
        size = int(fields[1])
    except ValueError:
        raise ManifestError(f"{where}: size {fields[1]!r} is not an integer") from None
    if size < 0:
        raise ManifestError(f"{where}: size {size} is negative")
    return fields[0], size


def read_manifest(path: str) -> Manifest:
    """Read a fairseq wav2vec ``{split}.tsv`` manifest (see the module docstring)."""
    lines = _read_lines(path, "manifest")
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}:1: empty manifest (the first line must be the root directory)")
    if len(lines) == 1:
        raise ManifestError(f"{path}:2: manifest has no entries after the root line")
    paths, sizes = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        rel, size = _parse_entry(line, f"{path}:{lineno}")
        paths.append(rel)
        sizes.append(size)
    return Manifest(root=lines[0].strip(), paths=paths, sizes=sizes, path=path)


def read_class_list(path: str) -> list[str]:
    """Read ``classes.txt``: one unique, non-empty name per line; id = 0-based line index."""
    names = _read_lines(path, "class list")
    if not names:
        raise ManifestError(f"{path}:1: class list is empty")
    first_line: dict[str, int] = {}
    for lineno, name in enumerate(names, start=1):
        if not name.strip():
            raise ManifestError(f"{path}:{lineno}: empty class name")
        if name in first_line:
            raise ManifestError(
                f"{path}:{lineno}: duplicate class name {name!r} (first on line {first_line[name]})"
            )
        first_line[name] = lineno
    return names


def _parse_ids(line: str, num_classes: int, where: str) -> list[int]:
    """Parse one ``{split}.lbl`` line of comma-separated class ids in [0, num_classes)."""
    if not line.strip():
        raise ManifestError(f"{where}: no class ids (each entry needs at least one)")
    ids = []
    for field in line.split(","):
        try:
            class_id = int(field)
        except ValueError:
            raise ManifestError(f"{where}: class id {field.strip()!r} is not an integer") from None
        if not 0 <= class_id < num_classes:
            raise ManifestError(f"{where}: class id {class_id} outside [0, {num_classes})")
        ids.append(class_id)
    return ids


def read_labels(path: str, num_entries: int, num_classes: int) -> list[list[int]]:
    """Read ``{split}.lbl``; returns one list of class ids per manifest entry."""
    lines = _read_lines(path, "label")
    if len(lines) != num_entries:
        raise ManifestError(
            f"{path}: label file has {len(lines)} lines but the manifest has "
            f"{num_entries} entries"
        )
    return [_parse_ids(line, num_classes, f"{path}:{i}") for i, line in enumerate(lines, start=1)]


def _check_field(value: str, what: str, index: int) -> None:
    """Refuse text that would break the line/tab structure of the output file."""
    if not value or any(c in value for c in "\t\r\n"):
        raise ValueError(f"{what} #{index} {value!r} is empty or contains a tab/newline")


def write_manifest(path: str, root: str, relpaths: list[str], sizes: list[int]) -> None:
    """Write a ``{split}.tsv`` manifest (root line, then ``relpath<TAB>size`` lines)."""
    if len(relpaths) != len(sizes):
        raise ValueError(f"{path}: {len(relpaths)} paths but {len(sizes)} sizes")
    _check_field(root, "root", 0)
    for i, rel in enumerate(relpaths):
        _check_field(rel, "relative path", i)
    with open(path, "w", encoding="utf-8") as f:
        f.write(root + "\n")
        f.writelines(f"{rel}\t{int(size)}\n" for rel, size in zip(relpaths, sizes))


def write_labels(path: str, labels: list[list[int]]) -> None:
    """Write a ``{split}.lbl`` file: one comma-separated line of class ids per entry."""
    for i, ids in enumerate(labels):
        if not ids:
            raise ValueError(f"{path}: entry #{i} has no class ids")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(",".join(str(int(c)) for c in ids) + "\n" for ids in labels)


def write_class_list(path: str, names: list[str]) -> None:
    """Write ``classes.txt``: one unique class name per line."""
    for i, name in enumerate(names):
        _check_field(name, "class name", i)
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: class names are not unique")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(name + "\n" for name in names)
