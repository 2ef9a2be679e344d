"""Teacher-target store: precomputed teacher (e.g. CLAP) feature maps, one file per split.

Byte format of ``{split}.tgt`` (version 1)::

    offset 0   8 bytes    magic b"MAMCLAPT"
    offset 8   4 bytes    H = length of the JSON header in bytes, uint32 little-endian
    offset 12  H bytes    UTF-8 JSON object with the TargetStoreHeader fields
               zero bytes up to the next multiple of 4096 (= data offset D)
    offset D   float16 little-endian, C-contiguous array of shape
               (num_clips, grid_freq, grid_time, dim), clips in manifest order

The file size is therefore exactly ``D + num_clips * grid_freq * grid_time * dim * 2``.
Clips that were never written read as zeros (the file is preallocated).

Teacher grid convention: ``store[i][ft, tt]`` is the teacher feature of frequency cell ``ft``
(0 = lowest frequencies) and time cell ``tt`` (0 = start of the clip); the ``grid_time``
cells split the first ``seconds`` of audio into equal parts.

Alignment to the student: the student's tokens are time-major over a (time_patches,
freq_patches) grid (default 64 x 8; token ``t * freq_patches + f``), each time patch covering
``patch_seconds`` (16 frames x 10 ms = 0.16 s), frequency patches splitting the mel axis
low-to-high into equal parts.  Each student token takes the teacher cell that contains its
centre time, and the teacher frequency row proportional to its frequency position (see
``alignment_index``).  The proportional frequency mapping ignores that teacher and student
cover different Hz ranges; a later issue refines it by Hz.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

MAGIC = b"MAMCLAPT"
VERSION = 1
ALIGNMENT = 4096
DTYPE = np.dtype("<f2")
_PREFIX_BYTES = len(MAGIC) + 4


class TargetStoreError(ValueError):
    """A target store is missing, malformed or does not match its manifest; names the file."""


@dataclass
class TargetStoreHeader:
    """JSON header of a target store.

    Attributes:
        teacher: name/identifier of the teacher model (e.g. a checkpoint name).
        grid_freq, grid_time: teacher feature-map size (frequency cells x time cells).
        dim: teacher feature dimension.
        sample_rate: the teacher's input sample rate in Hz.
        seconds: audio duration the teacher grid covers (e.g. 10.0).
        num_clips: number of clips (= manifest entries).
        version: format version, 1.
        extra: free-form JSON-serialisable metadata.
    """

    teacher: str
    grid_freq: int
    grid_time: int
    dim: int
    sample_rate: int
    seconds: float
    num_clips: int
    version: int = VERSION
    extra: dict = field(default_factory=dict)

    @property
    def clip_shape(self) -> tuple[int, int, int]:
        """(grid_freq, grid_time, dim)."""
        return (self.grid_freq, self.grid_time, self.dim)

    def data_bytes(self) -> int:
        """Size of the float16 array in bytes."""
        return self.num_clips * self.grid_freq * self.grid_time * self.dim * DTYPE.itemsize

    def validate(self, path: str) -> None:
        """Raise TargetStoreError naming ``path`` if a field has a wrong type or value."""
        if not isinstance(self.teacher, str) or not self.teacher:
            raise TargetStoreError(f"{path}: header field 'teacher' must be a non-empty string")
        for name in ("grid_freq", "grid_time", "dim", "sample_rate", "num_clips"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TargetStoreError(f"{path}: header field {name!r} must be an int >= 1, got {value!r}")
        seconds = self.seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise TargetStoreError(f"{path}: header field 'seconds' must be a number > 0, got {seconds!r}")
        if self.version != VERSION:
            raise TargetStoreError(f"{path}: unsupported version {self.version!r} (expected {VERSION})")
        if not isinstance(self.extra, dict):
            raise TargetStoreError(f"{path}: header field 'extra' must be a JSON object")


def _data_offset(json_bytes: int) -> int:
    """Offset of the array: magic + length + JSON, rounded up to a multiple of ALIGNMENT."""
    return -(-(_PREFIX_BYTES + json_bytes) // ALIGNMENT) * ALIGNMENT


def _encode_header(header: TargetStoreHeader) -> bytes:
    """Magic, JSON length, JSON and zero padding: everything before the array."""
    payload = json.dumps(dataclasses.asdict(header), sort_keys=True).encode("utf-8")
    prefix = MAGIC + len(payload).to_bytes(4, "little") + payload
    return prefix + b"\0" * (_data_offset(len(payload)) - len(prefix))


def _header_from_dict(fields: object, path: str) -> TargetStoreHeader:
    """Build and validate a header from parsed JSON."""
    if not isinstance(fields, dict):
        raise TargetStoreError(f"{path}: header is not a JSON object")
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


def _read_header(path: str) -> tuple[TargetStoreHeader, int]:
    """Parse the header of ``path``; returns (header, data offset)."""
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
    return _header_from_dict(fields, path), _data_offset(json_bytes)


class TargetStoreWriter:
    """Writes clips into a preallocated store; use as a context manager or call close()."""

    def __init__(self, path: str, header: TargetStoreHeader):
        header.validate(path)
        self.path = path
        self.header = header
        prefix = _encode_header(header)
        with open(path, "wb") as f:
            f.write(prefix)
            f.truncate(len(prefix) + header.data_bytes())
        self._data = np.memmap(path, dtype=DTYPE, mode="r+", offset=len(prefix),
                               shape=(header.num_clips, *header.clip_shape))

    def write(self, index: int, array) -> None:
        """Store clip ``index``: array-like of shape (grid_freq, grid_time, dim), finite, cast to fp16."""
        if self._data is None:
            raise TargetStoreError(f"{self.path}: write() after close()")
        index = int(index)
        if not 0 <= index < self.header.num_clips:
            raise IndexError(f"{self.path}: clip index {index} outside [0, {self.header.num_clips})")
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

    def flush(self) -> None:
        """Flush written clips to disk."""
        if self._data is not None:
            self._data.flush()

    def close(self) -> None:
        """Flush and release the file; further writes raise."""
        self.flush()
        self._data = None

    def __enter__(self) -> "TargetStoreWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def create_target_store(path: str, header: TargetStoreHeader) -> TargetStoreWriter:
    """Create (or overwrite) ``path`` with ``header`` and all clips zero; returns a writer."""
    return TargetStoreWriter(path, header)


@functools.lru_cache(maxsize=64)
def _alignment_index(grid_freq: int, grid_time: int, seconds: float,
                     time_patches: int, freq_patches: int, patch_seconds: float) -> np.ndarray:
    """Cached body of ``alignment_index`` (read-only result)."""
    centres = (np.arange(time_patches) + 0.5) * patch_seconds
    tt = np.clip(np.floor(centres * grid_time / seconds), 0, grid_time - 1).astype(np.int64)
    ft = np.floor((np.arange(freq_patches) + 0.5) * grid_freq / freq_patches).astype(np.int64)
    index = (ft[None, :] * grid_time + tt[:, None]).reshape(-1)
    index.setflags(write=False)
    return index


def alignment_index(header: TargetStoreHeader, time_patches: int, freq_patches: int,
                    patch_seconds: float = 0.16) -> np.ndarray:
    """Teacher cell of each student token.

    Returns:
        (time_patches * freq_patches,) int64, read-only; entry ``t * freq_patches + f`` is the
        flat index ``ft * grid_time + tt`` into the teacher's (grid_freq, grid_time) map, with
        ``tt = floor((t + 0.5) * patch_seconds / (seconds / grid_time))`` clipped to
        [0, grid_time - 1] and ``ft = floor((f + 0.5) * grid_freq / freq_patches)``.
        Cached per grid geometry and (time_patches, freq_patches).
    """
    if time_patches < 1 or freq_patches < 1 or not patch_seconds > 0:
        raise ValueError(
            f"need time_patches, freq_patches >= 1 and patch_seconds > 0, got "
            f"{time_patches}, {freq_patches}, {patch_seconds}"
        )
    return _alignment_index(header.grid_freq, header.grid_time, float(header.seconds),
                            int(time_patches), int(freq_patches), float(patch_seconds))


class TargetStore:
    """Read-only, memory-mapped target store (see the module docstring).

    The memory map is opened lazily and not pickled, so the store can be sent to
    DataLoader worker processes cheaply.
    """

    def __init__(self, path: str, header: TargetStoreHeader, offset: int):
        self.path = path
        self.header = header
        self._offset = offset
        self._data: np.memmap | None = None

    def _array(self) -> np.memmap:
        """The (num_clips, grid_freq, grid_time, dim) float16 memmap."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=DTYPE, mode="r", offset=self._offset,
                                   shape=(self.header.num_clips, *self.header.clip_shape))
        return self._data

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

    def aligned(self, index: int, time_patches: int, freq_patches: int) -> torch.Tensor:
        """Clip ``index`` mapped onto the student grid: float32 (time_patches * freq_patches, dim)."""
        flat = self[index].reshape(-1, self.header.dim)
        rows = alignment_index(self.header, time_patches, freq_patches)
        return torch.from_numpy(flat[rows].astype(np.float32))

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
    header, offset = _read_header(path)
    expected = offset + header.data_bytes()
    actual = os.path.getsize(path)
    if actual != expected:
        raise TargetStoreError(
            f"{path}: file is {actual} bytes but the header (num_clips={header.num_clips}, "
            f"grid {header.grid_freq}x{header.grid_time}, dim={header.dim}) needs {expected} bytes"
        )
    return TargetStore(path, header, offset)
