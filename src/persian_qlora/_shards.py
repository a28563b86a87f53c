"""Reading and writing safetensors checkpoints one tensor (or a few rows of one) at a time.

The safetensors library reads through a memory map of the whole file: every page a read touches stays resident in
the process until the file is closed, so streaming a 2 GB shard through ``safe_open`` ends with 2 GB resident
(checked). It also writes only whole dicts of tensors. Here tensors are read with plain positioned reads, so memory
holds only what the caller keeps, and written into shards whose layout is planned before the first byte, so each
shard is written front to back as the tensors are made. The format is an 8-byte little-endian header length, a
JSON header naming each tensor's dtype, shape and byte range, then the data.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from persian_qlora.errors import PersianQLoRAError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
COPY_CHUNK = 16 * 2**20  # bytes held at a time when a tensor is copied, cast or merged piece by piece

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a checkpoint lies: its file, absolute byte offset and size, dtype and shape."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes

    def row_chunks(self, max_bytes: int = COPY_CHUNK) -> Iterator[slice]:
        """Row ranges of at most ``max_bytes`` each (at least one row), covering the tensor."""
        rows = self.shape[0] if self.shape else 1
        step = max(1, max_bytes // max(1, self.row_bytes))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))


def _read_header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def read_safetensors_file(file: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file, in byte order."""
    file = Path(file)
    start, header = _read_header(file)
    header.pop("__metadata__", None)
    tensors: dict[str, StoredTensor] = {}
    for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise PersianQLoRAError(f"{file}: tensor {key} has dtype {entry['dtype']}, which this merge cannot read")
        tensors[key] = StoredTensor(key, file, start + begin, end - begin, dtype, tuple(entry["shape"]))
    return tensors


def read_checkpoint(directory: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors checkpoint (sharded with an index, or one ``model.safetensors``), in file and
    then byte order, so that streaming through them reads each file front to back."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (directory / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        raise PersianQLoRAError(
            f"{directory} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); the streaming merge reads "
            "safetensors only: convert the checkpoint with transformers (from_pretrained, then save_pretrained)"
        )
    tensors: dict[str, StoredTensor] = {}
    for name in files:
        tensors.update(read_safetensors_file(directory / name))
    return tensors


def read_tensor(stored: StoredTensor, rows: slice | None = None) -> torch.Tensor:
    """The tensor (or ``rows`` of it along the first dimension) in its stored dtype, read into fresh memory."""
    if rows is None:
        offset, nbytes, shape = stored.offset, stored.nbytes, stored.shape
    else:
        offset = stored.offset + rows.start * stored.row_bytes
        nbytes = (rows.stop - rows.start) * stored.row_bytes
        shape = (rows.stop - rows.start, *stored.shape[1:])
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    with open(stored.file, "rb") as handle:
        handle.seek(offset)
        if handle.readinto(buffer.numpy()) != nbytes:
            raise PersianQLoRAError(f"{stored.file} is truncated: tensor {stored.name} is incomplete")
    return buffer.view(stored.dtype).reshape(shape)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output: its name, dtype and shape, known before it is computed."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_size`` bytes (a larger tensor gets its own), as
    transformers' ``save_pretrained`` does."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header_bytes(shard: list[PlannedTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in shard:
        header[tensor.name] = {
            "dtype": _CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def planned_bytes(shards: list[list[PlannedTensor]]) -> int:
    return sum(len(_header_bytes(shard)) + sum(t.nbytes for t in shard) for shard in shards)


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Writes planned shards front to back: each tensor's bytes must come in the planned order, whole or in row
    pieces. ``close()`` checks that everything planned was written and writes the index of a sharded output."""

    def __init__(self, directory: Path, shards: list[list[PlannedTensor]]) -> None:
        self.directory = directory
        self._shards = dict(zip(shard_names(len(shards)), shards, strict=True))
        self._queue = [(name, tensor) for name, shard in self._shards.items() for tensor in shard]
        self._position = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of it written so far
        self._file_name: str | None = None
        self._handle = None

    @property
    def current(self) -> PlannedTensor:
        return self._queue[self._position][1]

    def write(self, name: str, data: torch.Tensor | bytes | memoryview) -> None:
        """Append ``data`` (a tensor of the planned dtype, or raw bytes) to the tensor ``name``."""
        planned = self._start(name)
        if isinstance(data, torch.Tensor):
            if data.dtype != planned.dtype:
                raise RuntimeError(f"shard writer: {name} is planned as {planned.dtype}, got {data.dtype}")
            data = data.contiguous().view(-1).view(torch.uint8).numpy().data
        self._handle.write(data)
        self._advance(name, len(data))

    def copy_range(self, name: str, source: Path, offset: int, nbytes: int) -> None:
        """Append ``nbytes`` of the file ``source`` from ``offset`` to the tensor ``name``, copied by the kernel
        (``copy_file_range``) so no byte passes through this process; read and written here where it cannot."""
        self._start(name)
        self._handle.flush()
        position = self._handle.tell()
        with open(source, "rb") as handle:
            copied = _kernel_copy(handle.fileno(), self._handle.fileno(), offset, position, nbytes)
            if copied < nbytes:
                self._handle.seek(position + copied)
                handle.seek(offset + copied)
                left = nbytes - copied
                while left:
                    piece = handle.read(min(left, COPY_CHUNK))
                    if not piece:
                        raise PersianQLoRAError(f"{source} is truncated: tensor {name} is incomplete")
                    self._handle.write(piece)
                    left -= len(piece)
            else:
                self._handle.seek(position + nbytes)
        self._advance(name, nbytes)

    def _start(self, name: str) -> PlannedTensor:
        file_name, planned = self._queue[self._position]
        if name != planned.name:
            raise RuntimeError(f"shard writer: expected {planned.name}, got {name}")
        if file_name != self._file_name:
            self._open(file_name)
        return planned

    def _advance(self, name: str, nbytes: int) -> None:
        planned = self.current
        self._written += nbytes
        if self._written > planned.nbytes:
            raise RuntimeError(f"shard writer: {name} got more bytes than its shape holds")
        if self._written == planned.nbytes:
            self._position += 1
            self._written = 0

    def _open(self, file_name: str) -> None:
        self._close_file()
        self._file_name = file_name
        self._handle = open(self.directory / file_name, "wb")  # noqa: SIM115 (closed in _close_file)
        self._handle.write(_header_bytes(self._shards[file_name]))

    def _close_file(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        self._close_file()
        if self._position != len(self._queue):
            raise RuntimeError(f"shard writer: {self._queue[self._position][1].name} was never written")
        if len(self._shards) > 1:
            weight_map = {t.name: name for name, shard in self._shards.items() for t in shard}
            index = {"metadata": {"total_size": sum(t.nbytes for s in self._shards.values() for t in s)}}
            index["weight_map"] = weight_map
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _kernel_copy(source: int, target: int, source_offset: int, target_offset: int, nbytes: int) -> int:
    """Copy with ``os.copy_file_range`` (Linux); the bytes copied, fewer than asked (down to 0) where the system
    or the file systems cannot (another OS, a kernel before 5.3 across file systems) or the source ends early."""
    if not hasattr(os, "copy_file_range"):
        return 0
    done = 0
    try:
        while done < nbytes:
            copied = os.copy_file_range(source, target, nbytes - done, source_offset + done, target_offset + done)
            if copied == 0:  # end of the source file
                break
            done += copied
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
            raise
    return done


def copy_bytes(stored: StoredTensor, writer: ShardWriter, name: str) -> None:
    """Write a stored tensor's bytes unchanged as the tensor ``name``."""
    writer.copy_range(name, stored.file, stored.offset, stored.nbytes)
