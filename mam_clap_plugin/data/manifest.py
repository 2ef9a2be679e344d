"""Manifest, class-list and label files.

* ``{split}.tsv`` -- fairseq wav2vec manifest: the first line is the root directory, then one
  ``relpath<TAB>num_samples`` line per clip (``num_samples`` at the file's native rate).
* ``classes.txt`` -- one class name per line; the class id is the 0-based line index.
* ``{split}.lbl`` -- one line per manifest entry (same order): comma-separated class ids,
  at least one per line (multi-label allowed), e.g. ``0,17,243``.

Every error is a ``ManifestError`` (a ValueError) whose message starts with ``file:line``.

Parsed files are held in numpy arrays, not Python lists (:class:`PackedRows`): a forked
DataLoader worker then shares their pages with the main process, where a list of 2 M
strings would be copied page by page as reading it touches each object's reference count.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class PackedRows(Sequence):
    """Rows of varying length in two numpy arrays: ``values`` (all rows end to end) and
    ``offsets`` (row ``i`` is ``values[offsets[i]:offsets[i + 1]]``).

    ``PackedRows.of_ids(rows)`` holds int64 class-id rows (items are numpy arrays);
    ``PackedRows.of_strings(rows)`` holds strings as UTF-8 bytes (items are str). Compares
    equal to a sequence of the same rows.
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray, strings: bool):
        self.values = values
        self.offsets = offsets
        self.strings = strings

    @classmethod
    def of_ids(cls, rows) -> "PackedRows":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        values = np.fromiter((v for r in rows for v in r), dtype=np.int64, count=int(lengths.sum()))
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), strings=False)

    @classmethod
    def of_strings(cls, rows) -> "PackedRows":
        encoded = [r.encode("utf-8") for r in rows]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        values = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), strings=True)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} outside [0, {len(self)})")
        row = self.values[self.offsets[i]:self.offsets[i + 1]]
        return row.tobytes().decode("utf-8") if self.strings else row

    def tolist(self) -> list:
        return [self[i] if self.strings else self[i].tolist() for i in range(len(self))]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        theirs = other.tolist() if isinstance(other, PackedRows) else [r if self.strings else list(r) for r in other]
        return self.tolist() == theirs

    def __add__(self, other) -> list:
        return self.tolist() + list(other.tolist() if isinstance(other, PackedRows) else other)

    def __repr__(self) -> str:
        return f"PackedRows({len(self)} rows, {self.values.nbytes + self.offsets.nbytes} bytes)"


class ManifestError(ValueError):
    """A manifest, class list or label file is malformed; the message names file:line."""


@dataclass
class Manifest:
    """A parsed ``{split}.tsv``.

    Attributes:
        root: directory the relative paths are relative to (first line of the file).
        paths: relative audio paths, one per entry (packed UTF-8, items are str).
        sizes: (entries,) int64 number of samples of each file at its native rate.
        path: the manifest file itself.
    """

    root: str
    paths: PackedRows
    sizes: np.ndarray
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
    return Manifest(root=lines[0].strip(), paths=PackedRows.of_strings(paths), sizes=np.array(sizes, dtype=np.int64),
                    path=path)


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


def read_labels(path: str, num_entries: int, num_classes: int) -> PackedRows:
    """Read ``{split}.lbl``; returns the class ids of each manifest entry (packed int64 rows)."""
    lines = _read_lines(path, "label")
    if len(lines) != num_entries:
        raise ManifestError(
            f"{path}: label file has {len(lines)} lines but the manifest has "
            f"{num_entries} entries"
        )
    return PackedRows.of_ids([_parse_ids(line, num_classes, f"{path}:{i}") for i, line in enumerate(lines, start=1)])


def multi_hot(labels: Sequence, num_classes: int) -> np.ndarray:
    """(entries, num_classes) float32 targets, 1 at each entry's class ids (:func:`read_labels`' rows)."""
    target = np.zeros((len(labels), num_classes), dtype=np.float32)
    for i, ids in enumerate(labels):
        target[i, ids] = 1.0
    return target


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
