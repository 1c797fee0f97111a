"""Reads safetensors headers (names, dtypes, shapes, byte ranges) without
touching tensor data, and validates them against the file's real size.

The header is untrusted input: its length, JSON and every entry are checked
before anything is believed, so a forged or truncated file is a clear
:class:`MixedError` and never a large allocation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vllm_mixed.errors import MixedError

__all__ = ["DTYPE_SIZES", "ShardIdentity", "TensorInfo", "read_header", "read_header_and_identity", "shard_identity"]

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# safetensors itself refuses headers above 100 MB
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the header alone."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardIdentity:
    """What ``compose`` records of a shard it plans to read: the file size and
    the sha256 of its header bytes (length field and JSON). Cheap to check (no
    tensor data is read), blind to mtime (a byte-identical copy is the same
    shard), and it changes whenever any tensor's name, dtype, shape or offsets
    do. Data rewritten in place under an identical header is not detected."""

    nbytes: int
    header_sha256: str


def _open_header(path: Path) -> BinaryIO:
    """The shard, unbuffered and with the kernel's readahead off: reading the
    header reads its own pages, not megabytes of tensor data after it (which
    the loader may never need and would count as bytes read)."""
    f = path.open("rb", buffering=0)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
    return f  # type: ignore[return-value]


def _read(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the file."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def shard_identity(path: Path) -> ShardIdentity | None:
    """The identity of a shard as it is on disk now; ``None`` if it is missing.
    A damaged header is hashed as far as it goes (the caller only compares)."""
    try:
        size = path.stat().st_size
        with _open_header(path) as f:
            head = _read(f, 8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            body = _read(f, n) if n <= min(MAX_HEADER_BYTES, size - 8) else b""
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MixedError(f"{path}: cannot read the shard ({exc}); check the file's permissions") from None
    return ShardIdentity(size, hashlib.sha256(head + body).hexdigest())


def read_header(path: Path) -> dict[str, TensorInfo]:
    """All tensors of one ``.safetensors`` file, validated against its size."""
    return read_header_and_identity(path)[0]


def read_header_and_identity(path: Path) -> tuple[dict[str, TensorInfo], ShardIdentity]:
    """One read of a shard's header gives both its tensors (validated against
    the file's size) and its identity (what ``compose`` records)."""
    fix = f"the file is damaged or not safetensors; re-download or re-export {path.name}"
    try:
        size = path.stat().st_size
        with _open_header(path) as f:
            head = _read(f, 8)
            if len(head) < 8:
                raise MixedError(f"{path}: file is {size} bytes, too short for a safetensors header; {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise MixedError(
                    f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after the length field "
                    f"(limit {MAX_HEADER_BYTES}); {fix}"
                )
            raw = _read(f, n)
    except FileNotFoundError:
        raise MixedError(f"{path}: shard file is missing; restore it or re-download the checkpoint") from None
    identity = ShardIdentity(size, hashlib.sha256(head + raw).hexdigest())
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, over-long ints, deep nesting
        raise MixedError(f"{path}: safetensors header is not valid JSON ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise MixedError(f"{path}: safetensors header is not a JSON object; {fix}")
    data_start = 8 + n
    data_size = size - data_start
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _entry(path, name, entry, data_start, data_size, fix)
    return tensors, identity


def _entry(path: Path, name: str, entry: object, data_start: int, data_size: int, fix: str) -> TensorInfo:
    bad = f"{path}: tensor {name!r} has a malformed header entry"
    if not isinstance(entry, dict):
        raise MixedError(f"{bad} ({entry!r}); {fix}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise MixedError(f"{bad}: unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_SIZES))}); {fix}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise MixedError(f"{bad}: shape {shape!r} is not a list of non-negative integers; {fix}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise MixedError(f"{bad}: data_offsets {offsets!r} are not [begin, end]; {fix}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise MixedError(
            f"{bad}: shape {shape} of {dtype} needs {expected} bytes but data_offsets span {offsets[1] - offsets[0]}; {fix}"
        )
    if offsets[1] > data_size:
        raise MixedError(
            f"{path}: truncated: tensor {name!r} ends at byte {offsets[1]} of the data section "
            f"but the file holds only {data_size}; {fix}"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
