"""Teacher-target store: precomputed teacher (CLAP) token maps, one file per split.

Byte format of ``{split}.tgt`` (version 2)::

    offset 0   8 bytes    magic b"MAMCLAPT"
    offset 8   4 bytes    H = length of the JSON header in bytes, uint32 little-endian
    offset 12  H bytes    UTF-8 JSON object with the TargetStoreHeader fields
               zero bytes up to the next multiple of 4096 (= flags offset G)
    offset G   num_clips bytes, one state per clip: 0 = not written yet, 1 = written,
               2 = audio unusable (skipped by the extractor)
               zero bytes up to the next multiple of 4096 (= data offset D)
    offset D   float16 little-endian, C-contiguous array of shape
               (num_clips, grid_freq, grid_time, dim), clips in manifest order

The file size is therefore exactly ``D + num_clips * grid_freq * grid_time * dim * 2``.
The file's blocks are allocated when it is created (``posix_fallocate``: a full disk is an
``OSError`` then, naming the store and the bytes it needs); the per-clip states let an interrupted extraction
resume, let several shard processes fill one file, and let training refuse a store
that is not complete.

Teacher grid convention: ``store[i][ft, tt]`` is the teacher feature of frequency band
``ft`` (0 = lowest; band edges ``freq_edges_hz``) and time cell ``tt`` (0 = start of the
clip); the ``grid_time`` cells split the first ``seconds`` of audio into equal parts.
The store holds the teacher's own grid: alignment to the student's patches happens when
training reads it (:mod:`mam_clap_plugin.data.alignment`).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..files import free_space
from ..teacher.base import LAYERS
from .alignment import Alignment, alignment

MAGIC = b"MAMCLAPT"
VERSION = 2
ALIGNMENT = 4096
DTYPE = np.dtype("<f2")
_PREFIX_BYTES = len(MAGIC) + 4

#: Per-clip states in the flags region.
PENDING, WRITTEN, BAD_AUDIO = 0, 1, 2


class TargetStoreError(ValueError):
    """A target store is missing, malformed, incomplete or does not match its manifest
    or configuration; names the file."""


@dataclass
class TargetStoreHeader:
    """JSON header of a target store.

    Attributes:
        teacher: teacher model name, e.g. ``laion-clap-htsat-tiny``.
        checkpoint_sha256: sha256 of the teacher checkpoint file.
        layer: teacher map, ``final`` (after the last norm) or ``stage3``.
        projection: True if the per-token ``audio_projection`` was applied.
        grid_freq, grid_time: teacher map size (frequency bands x time cells).
        dim: teacher feature dimension.
        sample_rate: the teacher's input sample rate in Hz.
        seconds: audio duration the teacher map covers (the first ``seconds`` of a clip).
        freq_edges_hz: ``grid_freq + 1`` band edges in Hz, ascending.
        num_clips: number of clips (= manifest entries).
        version: format version, 2.
        extra: free-form JSON-serialisable metadata.
    """

    teacher: str
    checkpoint_sha256: str
    layer: str
    projection: bool
    grid_freq: int
    grid_time: int
    dim: int
    sample_rate: int
    seconds: float
    freq_edges_hz: list
    num_clips: int
    version: int = VERSION
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_teacher(cls, teacher, checkpoint_sha256: str, num_clips: int, **extra) -> "TargetStoreHeader":
        """Header for the maps of a teacher (the contract of :mod:`mam_clap_plugin.teacher.base`:
        name, layer, projection, grid, dim, sample_rate, seconds, freq_edges_hz)."""
        return cls(
            teacher=teacher.name, checkpoint_sha256=checkpoint_sha256, layer=teacher.layer,
            projection=bool(teacher.projection), grid_freq=teacher.grid[0], grid_time=teacher.grid[1],
            dim=teacher.dim, sample_rate=teacher.sample_rate, seconds=float(teacher.seconds),
            freq_edges_hz=[float(e) for e in teacher.freq_edges_hz()], num_clips=num_clips, extra=extra,
        )

    @property
    def clip_shape(self) -> tuple[int, int, int]:
        """(grid_freq, grid_time, dim)."""
        return (self.grid_freq, self.grid_time, self.dim)

    @property
    def clip_bytes(self) -> int:
        """Bytes of one clip's map."""
        return self.grid_freq * self.grid_time * self.dim * DTYPE.itemsize

    def data_bytes(self) -> int:
        """Size of the float16 array in bytes."""
        return self.num_clips * self.clip_bytes

    def teacher_key(self) -> dict:
        """The fields that identify the teacher and its map; stores that differ in any
        of them hold incompatible targets."""
        return {k: getattr(self, k) for k in ("teacher", "checkpoint_sha256", "layer", "projection", "grid_freq",
                                              "grid_time", "dim", "sample_rate", "seconds", "freq_edges_hz")}

    def teacher_differences(self, other: "TargetStoreHeader") -> list[str]:
        """Names of the :meth:`teacher_key` fields where ``other`` differs from this header."""
        mine, theirs = self.teacher_key(), other.teacher_key()
        return [k for k in mine if mine[k] != theirs[k]]

    def alignment(self, time_patches: int, freq_patches: int) -> Alignment:
        """Teacher cell of each student token (see :mod:`mam_clap_plugin.data.alignment`)."""
        return alignment(self.grid_freq, self.grid_time, self.seconds, self.freq_edges_hz,
                         time_patches, freq_patches)

    def validate(self, path: str) -> None:
        """Raise TargetStoreError naming ``path`` if a field has a wrong type or value."""
        for name in ("teacher", "checkpoint_sha256"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TargetStoreError(f"{path}: header field {name!r} must be a non-empty string")
        if self.layer not in LAYERS:
            raise TargetStoreError(f"{path}: header field 'layer' must be one of {LAYERS}, got {self.layer!r}")
        if not isinstance(self.projection, bool):
            raise TargetStoreError(f"{path}: header field 'projection' must be true or false")
        for name in ("grid_freq", "grid_time", "dim", "sample_rate", "num_clips"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TargetStoreError(f"{path}: header field {name!r} must be an int >= 1, got {value!r}")
        seconds = self.seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise TargetStoreError(f"{path}: header field 'seconds' must be a number > 0, got {seconds!r}")
        edges = self.freq_edges_hz
        if (not isinstance(edges, list) or len(edges) != self.grid_freq + 1
                or not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges)
                or any(b <= a for a, b in zip(edges, edges[1:]))):
            raise TargetStoreError(
                f"{path}: header field 'freq_edges_hz' must list grid_freq + 1 = {self.grid_freq + 1} "
                f"ascending frequencies, got {edges!r}"
            )
        if self.version != VERSION:
            raise TargetStoreError(f"{path}: unsupported version {self.version!r} (expected {VERSION})")
        if not isinstance(self.extra, dict):
            raise TargetStoreError(f"{path}: header field 'extra' must be a JSON object")


def _round_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _offsets(json_bytes: int, num_clips: int) -> tuple[int, int]:
    """(flags offset, data offset) for a JSON header of ``json_bytes`` bytes."""
    flags = _round_up(_PREFIX_BYTES + json_bytes)
    return flags, flags + _round_up(num_clips)


def _encode_header(header: TargetStoreHeader) -> bytes:
    """Magic, JSON length, JSON and zero padding up to the flags region."""
    payload = json.dumps(dataclasses.asdict(header), sort_keys=True).encode("utf-8")
    prefix = MAGIC + len(payload).to_bytes(4, "little") + payload
    return prefix + b"\0" * (_round_up(len(prefix)) - len(prefix))


def _header_from_dict(fields: object, path: str) -> TargetStoreHeader:
    """Build and validate a header from parsed JSON."""
    if not isinstance(fields, dict):
        raise TargetStoreError(f"{path}: header is not a JSON object")
    if fields.get("version") != VERSION:
        raise TargetStoreError(
            f"{path}: unsupported version {fields.get('version')!r} (expected {VERSION}); "
            "re-extract it with examples/prepare/extract_clap_targets.py"
        )
    names = {f.name for f in dataclasses.fields(TargetStoreHeader)}
    required = {f.name for f in dataclasses.fields(TargetStoreHeader)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - fields.keys())
    if missing:
        raise TargetStoreError(f"{path}: header is missing fields {missing}")
    unknown = sorted(fields.keys() - names)
    if unknown:
        raise TargetStoreError(f"{path}: header has unknown fields {unknown}")
    header = TargetStoreHeader(**fields)
    header.validate(path)
    return header


def read_header(path: str) -> tuple[TargetStoreHeader, int, int]:
    """Parse the header of ``path``; returns (header, flags offset, data offset)."""
    if not os.path.isfile(path):
        raise TargetStoreError(f"{path}: target store not found")
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX_BYTES)
        if len(prefix) < _PREFIX_BYTES or prefix[: len(MAGIC)] != MAGIC:
            raise TargetStoreError(f"{path}: bad magic, not a target store (expected {MAGIC!r} at byte 0)")
        json_bytes = int.from_bytes(prefix[len(MAGIC):], "little")
        payload = f.read(json_bytes)
    if len(payload) != json_bytes:
        raise TargetStoreError(f"{path}: truncated header ({len(payload)} of {json_bytes} bytes)")
    try:
        fields = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TargetStoreError(f"{path}: unparsable JSON header ({err})") from None
    header = _header_from_dict(fields, path)
    flags, data = _offsets(json_bytes, header.num_clips)
    expected = data + header.data_bytes()
    actual = os.path.getsize(path)
    if actual != expected:
        raise TargetStoreError(
            f"{path}: file is {actual} bytes but the header (num_clips={header.num_clips}, "
            f"grid {header.grid_freq}x{header.grid_time}, dim={header.dim}) needs {expected} bytes"
        )
    return header, flags, data


def _mismatch(a: TargetStoreHeader, b: TargetStoreHeader) -> list[str]:
    """Names of the teacher-identifying fields (and clip count) where two headers differ."""
    out = [f"{k}: {getattr(a, k)!r} vs {getattr(b, k)!r}" for k in a.teacher_differences(b)]
    if a.num_clips != b.num_clips:
        out.append(f"num_clips: {a.num_clips} vs {b.num_clips}")
    return out


class TargetStoreWriter:
    """Writes clips into a store; several processes may fill disjoint clips of one file.

    Use :func:`create_target_store` (new file) or :func:`open_target_store_for_writing`
    (create or resume). ``write`` marks a clip written only after its data is stored, so
    an interrupted process loses at most the clips not yet flushed.
    """

    def __init__(self, path: str, header: TargetStoreHeader, flags_offset: int, data_offset: int):
        self.path = path
        self.header = header
        self._flags = np.memmap(path, dtype=np.uint8, mode="r+", offset=flags_offset, shape=(header.num_clips,))
        self._data = np.memmap(path, dtype=DTYPE, mode="r+", offset=data_offset,
                               shape=(header.num_clips, *header.clip_shape))

    @property
    def states(self) -> np.ndarray:
        """(num_clips,) uint8 clip states (PENDING, WRITTEN, BAD_AUDIO); a live view."""
        if self._flags is None:
            raise TargetStoreError(f"{self.path}: store is closed")
        return self._flags

    def _check_index(self, index) -> int:
        if self._data is None:
            raise TargetStoreError(f"{self.path}: write() after close()")
        index = int(index)
        if not 0 <= index < self.header.num_clips:
            raise IndexError(f"{self.path}: clip index {index} outside [0, {self.header.num_clips})")
        return index

    def write(self, index: int, array) -> None:
        """Store clip ``index``: array-like (grid_freq, grid_time, dim), finite, cast to fp16."""
        index = self._check_index(index)
        array = np.asarray(array)
        if array.shape != self.header.clip_shape:
            raise TargetStoreError(
                f"{self.path}: clip {index} has shape {array.shape}, expected "
                f"(grid_freq, grid_time, dim) = {self.header.clip_shape}"
            )
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            half = array.astype(DTYPE)
        if not np.isfinite(half).all():
            raise TargetStoreError(
                f"{self.path}: clip {index} has NaN/Inf values (or values beyond the float16 range)"
            )
        self._data[index] = half
        self._flags[index] = WRITTEN

    def mark_bad(self, index: int) -> None:
        """Record that clip ``index`` has unusable audio (training then skips or refuses it)."""
        self._flags[self._check_index(index)] = BAD_AUDIO

    def flush(self) -> None:
        """Flush the data, then the clip states, to disk."""
        if self._data is not None:
            self._data.flush()
            self._flags.flush()

    def close(self) -> None:
        """Flush and release the file; further writes raise."""
        self.flush()
        self._data = None
        self._flags = None

    def __enter__(self) -> "TargetStoreWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _allocate(f, path: str, size: int) -> None:
    """Reserve ``size`` bytes of disk for the open file ``f``, so that a full disk is an error now
    (an ``OSError`` naming ``path`` and the bytes needed), not a SIGBUS when a memory-mapped
    write later lands on a hole. File systems without fallocate get a sparse file."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            f.truncate(size)
            return
        free = free_space(os.path.dirname(os.path.abspath(path)))
        raise OSError(err.errno, f"{path}: cannot allocate the target store: {size} bytes needed, {free} "
                                 f"({err.strerror})") from err


def _write_empty(path: str, header: TargetStoreHeader, store: str | None = None) -> None:
    """Write a store with every clip pending, its blocks allocated; a failure removes ``path``
    (errors name ``store``, the final name, when ``path`` is a temporary file)."""
    prefix = _encode_header(header)
    size = len(prefix) + _round_up(header.num_clips) + header.data_bytes()
    try:
        with open(path, "wb") as f:
            f.write(prefix)
            _allocate(f, store or path, size)
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise


def create_target_store(path: str, header: TargetStoreHeader) -> TargetStoreWriter:
    """Create (or overwrite) ``path`` with every clip pending; returns a writer."""
    header.validate(path)
    _write_empty(path, header)
    _, flags, data = read_header(path)
    return TargetStoreWriter(path, header, flags, data)


def open_target_store_for_writing(path: str, header: TargetStoreHeader) -> TargetStoreWriter:
    """Create ``path``, or reopen it to resume, safely from several processes at once.

    A new file is built under a temporary name (``path.tmp-PID``, its blocks allocated: a
    full disk raises an ``OSError`` naming the store and the bytes it needs, and leaves no
    temporary file) and hard-linked into place, so exactly one process creates it. An
    existing file must have been made for the same teacher, map and clip count, else
    TargetStoreError lists the differences.
    """
    header.validate(path)
    if not os.path.exists(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            _write_empty(tmp, header, store=path)
            os.link(tmp, path)
        except FileExistsError:
            pass  # another shard created it first
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    existing, flags, data = read_header(path)
    diff = _mismatch(existing, header)
    if diff:
        raise TargetStoreError(
            f"{path}: exists with targets of another teacher or map; refusing to mix them "
            f"({'; '.join(diff)}). Use another output directory or delete the file."
        )
    return TargetStoreWriter(path, existing, flags, data)


class TargetStore:
    """Read-only, memory-mapped target store (see the module docstring).

    The memory maps are opened lazily and not pickled, so the store can be sent to
    DataLoader worker processes cheaply.
    """

    def __init__(self, path: str, header: TargetStoreHeader, flags_offset: int, data_offset: int):
        self.path = path
        self.header = header
        self._flags_offset = flags_offset
        self._offset = data_offset
        self._data: np.memmap | None = None

    def _array(self) -> np.memmap:
        """The (num_clips, grid_freq, grid_time, dim) float16 memmap."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=DTYPE, mode="r", offset=self._offset,
                                   shape=(self.header.num_clips, *self.header.clip_shape))
        return self._data

    def states(self) -> np.ndarray:
        """(num_clips,) uint8 clip states, read now."""
        return np.array(np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._flags_offset,
                                  shape=(self.header.num_clips,)))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return self.header.num_clips

    def __getitem__(self, index: int) -> np.ndarray:
        """Clip ``index`` as a read-only float16 array of shape (grid_freq, grid_time, dim)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: clip index {index} outside [0, {len(self)})")
        return np.asarray(self._array()[index])

    def check_complete(self) -> np.ndarray:
        """Raise TargetStoreError unless every clip is written or marked bad; returns the
        indices of the clips marked bad."""
        states = self.states()
        pending = np.flatnonzero(states == PENDING)
        if len(pending):
            raise TargetStoreError(
                f"{self.path}: incomplete, {len(pending)} of {len(states)} clips not extracted yet "
                f"(first: clip {pending[0]}); run or resume examples/prepare/extract_clap_targets.py"
            )
        return np.flatnonzero(states == BAD_AUDIO)

    def check(self, num_clips: int, dim: int | None = None) -> None:
        """Raise TargetStoreError if the store does not match the manifest / model."""
        if self.header.num_clips != num_clips:
            raise TargetStoreError(
                f"{self.path}: store has {self.header.num_clips} clips but the manifest has {num_clips}"
            )
        if dim is not None and self.header.dim != dim:
            raise TargetStoreError(
                f"{self.path}: store has target dim {self.header.dim} but {dim} was expected"
            )


def open_target_store(path: str) -> TargetStore:
    """Open and validate a target store (header fields and exact file size)."""
    header, flags, data = read_header(path)
    return TargetStore(path, header, flags, data)


def check_one_teacher(directory: str, header: TargetStoreHeader | None = None,
                      skip: str | None = None) -> TargetStoreHeader | None:
    """Refuse a directory whose ``*.tgt`` stores come from different teachers or maps.

    Every store in ``directory`` (but the file named ``skip``) is compared with ``header``
    (an extraction about to write there) or, without one, with the directory's first store
    in name order. Returns that reference header; None when there is neither.
    """
    names = sorted(n for n in os.listdir(directory) if n.endswith(".tgt") and n != skip)
    reference, ref_name = header, "this extraction"
    for name in names:
        path = os.path.join(directory, name)
        other, _, _ = read_header(path)
        if reference is None:
            reference, ref_name = other, name
            continue
        diff = reference.teacher_differences(other)
        if diff:
            raise TargetStoreError(
                f"{path}: made with another teacher or map than {ref_name} (fields {diff} differ); "
                "the stores of one directory must all come from one teacher and map"
            )
    return reference
