"""The header reader agrees with safetensors itself and refuses forged or
damaged files without reading (or allocating) what the header claims."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_mixed.errors import MixedError
from vllm_mixed.safetensors_header import DTYPE_SIZES, MAX_HEADER_BYTES, read_header


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check_against_safetensors(path: Path) -> int:
    """Every fact of read_header equals safe_open's; returns the tensor count."""
    infos = read_header(path)
    data = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        assert sorted(infos) == sorted(f.keys())
        for name, info in infos.items():
            sl = f.get_slice(name)
            tensor = f.get_tensor(name)
            assert info.name == name
            assert info.file == path
            assert info.dtype == sl.get_dtype()
            assert list(info.shape) == list(sl.get_shape()) == list(tensor.shape)
            assert info.nbytes == info.end - info.start == tensor.numel() * tensor.element_size()
            assert data[info.start : info.end] == raw_bytes(tensor), name
    return len(infos)


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "gptq-int4"])
def test_header_matches_safe_open_on_tiny_shards(tiny_master: Path, fmt: str) -> None:
    shards = sorted((tiny_master / fmt).glob("*.safetensors"))
    assert len(shards) >= 2
    assert sum(check_against_safetensors(s) for s in shards) > 50


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape) * 3).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(lo, hi, shape, dtype=torch.int64).to(dtype)


def test_header_matches_safe_open_for_every_dtype(tmp_path: Path) -> None:
    dtypes = {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
        "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
        "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
    }  # fmt: skip
    assert set(dtypes) == set(DTYPE_SIZES)
    tensors = {f"t.{name}": random_tensor(dt, (3, 5)) for name, dt in dtypes.items()}
    tensors["scalar"] = torch.randn(())
    tensors["empty"] = torch.randn(0, 7)
    tensors["odd"] = random_tensor(torch.int8, (7,))  # leaves later tensors unaligned
    tensors["big"] = torch.randn(33, 65)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "metadata is skipped"})
    assert check_against_safetensors(path) == len(tensors)
    infos = read_header(path)
    for name, dt in dtypes.items():
        assert DTYPE_SIZES[name] == torch.empty((), dtype=dt).element_size()
        assert infos[f"t.{name}"].dtype == name
    assert "__metadata__" not in infos


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def refused_small(path: Path) -> str:
    """read_header's MixedError message, and proof it allocated little."""
    tracemalloc.start()
    try:
        with pytest.raises(MixedError) as exc:
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"read_header allocated {peak} bytes on a forged file"
    msg = str(exc.value)
    assert str(path) in msg
    return msg


@pytest.mark.parametrize("claimed", [2**64 - 1, 2**40, MAX_HEADER_BYTES + 1, MAX_HEADER_BYTES - 1])
def test_forged_header_length(tmp_path: Path, claimed: int) -> None:
    path = write_raw(
        tmp_path / "forged.safetensors",
        {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        b"\0" * 4,
        claimed,
    )
    msg = refused_small(path)
    assert f"header claims {claimed} bytes" in msg
    assert f"the file has {path.stat().st_size - 8} after the length field" in msg
    assert "re-download or re-export forged.safetensors" in msg


@pytest.mark.parametrize("end", [2**40, 2**62, 10**30])
def test_forged_data_offsets(tmp_path: Path, end: int) -> None:
    header = {"t": {"dtype": "U8", "shape": [end], "data_offsets": [0, end]}}
    msg = refused_small(write_raw(tmp_path / "forged.safetensors", header, b"\0" * 16))
    assert f"truncated: tensor 't' ends at byte {end} of the data section but the file holds only 16" in msg


def test_offsets_disagree_with_shape(tmp_path: Path) -> None:
    header = {"t": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}}
    msg = refused_small(write_raw(tmp_path / "x.safetensors", header, b"\0" * 12))
    assert "tensor 't'" in msg
    assert "shape [2, 3] of BF16 needs 12 bytes but data_offsets span 10" in msg


@pytest.mark.parametrize(
    "entry,expected",
    [
        ({"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}, "unknown dtype 'Q4' (known: BF16, BOOL,"),
        ({"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}, "shape [-1] is not a list of non-negative integers"),
        (
            {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]},
            "shape [True] is not a list of non-negative integers",
        ),
        ({"dtype": "U8", "shape": "1", "data_offsets": [0, 1]}, "shape '1' is not a list"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}, "data_offsets [1, 0] are not [begin, end]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0]}, "data_offsets [0] are not [begin, end]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}, "data_offsets [-1, 0] are not [begin, end]"),
        ({"dtype": "U8", "shape": [1]}, "data_offsets None are not [begin, end]"),
        ([1, 2], "malformed header entry ([1, 2])"),
    ],
)
def test_malformed_entry(tmp_path: Path, entry: object, expected: str) -> None:
    msg = refused_small(
        write_raw(
            tmp_path / "x.safetensors",
            {"ok": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, "bad": entry},
            b"\0" * 8,
        )
    )
    assert "tensor 'bad'" in msg
    assert expected in msg


@pytest.mark.parametrize(
    "body,expected",
    [
        (b"\xff\xfe garbage \x00\x01", "safetensors header is not valid JSON"),
        (b'{"t": {"dtype": "U8", ', "safetensors header is not valid JSON"),
        (b"", "safetensors header is not valid JSON"),
        (b"[1, 2, 3]", "safetensors header is not a JSON object"),
    ],
)
def test_header_not_json_object(tmp_path: Path, body: bytes, expected: str) -> None:
    msg = refused_small(write_raw(tmp_path / "x.safetensors", body, b"\0" * 8))
    assert expected in msg
    assert "the file is damaged or not safetensors" in msg


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_too_short(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    assert f"file is {size} bytes, too short for a safetensors header" in refused_small(path)


def test_truncated_real_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(4, 4), "b": torch.randn(10)}, str(path))
    full = path.read_bytes()
    last = max(read_header(path).values(), key=lambda t: t.end)
    path.write_bytes(full[:-1])
    msg = refused_small(path)
    header_len = struct.unpack("<Q", full[:8])[0]
    assert f"truncated: tensor {last.name!r} ends at byte {last.end - 8 - header_len}" in msg
    assert f"holds only {len(full) - 9 - header_len}" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MixedError) as exc:
        read_header(tmp_path / "gone.safetensors")
    assert f"{tmp_path / 'gone.safetensors'}: shard file is missing" in str(exc.value)


def test_header_only_reads_header(tmp_path: Path) -> None:
    """A big data section is never read: the reader's peak memory stays far below it."""
    path = tmp_path / "big.safetensors"
    big = torch.randn(2048, 2048)  # 16 MiB
    save_file({"big": big}, str(path))
    tracemalloc.start()
    try:
        infos = read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert infos["big"].nbytes == math.prod(big.shape) * 4
    assert peak < 2**20


def test_header_reads_turn_readahead_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning and the shard identity read only a shard's header pages: the
    kernel is told not to read ahead into the tensor data (the load's bytes
    read would otherwise grow by up to the readahead window per shard)."""
    import os

    from vllm_mixed.safetensors_header import shard_identity

    path = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(path))
    advice: list[int] = []
    fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: (advice.append(how), fadvise(fd, off, n, how)))
    assert set(read_header(path)) == {"w"}
    assert shard_identity(path) is not None
    assert advice == [os.POSIX_FADV_RANDOM, os.POSIX_FADV_RANDOM]
