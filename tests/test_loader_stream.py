"""The loader's stream (``stream_plan``) on shards damaged after planning, and
on consumers that stop early: the fault is a :class:`MixedError` naming the
file and tensor, every reader thread has exited when control returns, and no
tensor read stays alive once the consumer has dropped what it was given, even
while the error itself is still held (its traceback keeps the stream's frame)."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vllm_mixed import loader
from vllm_mixed.errors import MixedError
from vllm_mixed.plan import LoadPlan, PlannedLayer
from vllm_mixed.safetensors_header import TensorInfo, read_header

ROWS, COLS = 256, 1024  # 1 MiB of float32 per tensor
PER_SHARD = 12


def write_shard(path: Path, prefix: str, reshaped: str | None = None) -> None:
    tensors = {f"{prefix}.{i}.weight": torch.full((ROWS, COLS), float(i)) for i in range(PER_SHARD)}
    if reshaped is not None:  # same bytes, same offsets, another shape
        tensors[reshaped] = tensors[reshaped].reshape(COLS, ROWS)
    save_file(tensors, str(path))


def in_file_order(path: Path) -> list[TensorInfo]:
    return sorted(read_header(path).values(), key=lambda t: t.start)


def plan_of(infos: list[TensorInfo], fmt: str = "gptq_int4") -> LoadPlan:
    """One planned layer of these tensors; ``gptq_int4`` keeps raw tensors
    as they are (``_runtime`` casts none of these names), ``unquantized``
    casts weights to the model dtype."""
    layers = [PlannedLayer(layer=None, source="s", format=fmt, precision="-", tensors=tuple(infos))]  # type: ignore[arg-type]
    return LoadPlan(recipe=None, sources={}, layers=layers)  # type: ignore[arg-type]


def make_plan(tmp_path: Path, ghost: bool = False) -> tuple[LoadPlan, Path, Path]:
    """Two shards of PER_SHARD tensors, planned as unquantized weights."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_shard(a, "a")
    write_shard(b, "b")
    infos = [*read_header(a).values(), *read_header(b).values()]
    if ghost:  # planned, within the file's bytes, but not in its header
        late = in_file_order(b)[-2]
        infos.append(TensorInfo("b.ghost.weight", late.file, late.dtype, late.shape, late.start, late.end))
    return plan_of(infos, "unquantized"), a, b


@pytest.fixture
def read_tensors(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[torch.Tensor]]:
    """Weak references to every tensor the readers produce (before and after
    the cast to the model dtype); a small queue so that readers block on it."""
    refs: list[weakref.ref[torch.Tensor]] = []
    runtime = loader._runtime

    def tracking(t: torch.Tensor, fmt: str, suffix: str, model_dtype: torch.dtype) -> torch.Tensor:
        out = runtime(t, fmt, suffix, model_dtype)
        refs.extend((weakref.ref(t), weakref.ref(out)))
        return out

    monkeypatch.setattr(loader, "_runtime", tracking)
    monkeypatch.setattr(loader, "QUEUE_CHUNKS", 1)
    monkeypatch.setattr(loader, "CHUNK_BYTES", 2 * ROWS * COLS * 4)  # two tensors per read
    monkeypatch.setattr(loader, "READ_THREADS", 1)  # shard a, then b: the fault in b comes after tensors were read
    return refs


def reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vllm-mixed")]


def consume(stream: Iterator[tuple[str, torch.Tensor]], limit: int | None = None) -> list[str]:
    """Take names (dropping each tensor at once) until the end or ``limit``."""
    names: list[str] = []
    while limit is None or len(names) < limit:
        item = next(stream, None)
        if item is None:
            break
        assert item[1].dtype == torch.bfloat16  # cast from the file's float32
        names.append(item[0])
        item = None
    return names


def assert_released(refs: list[weakref.ref[torch.Tensor]]) -> None:
    assert reader_threads() == []
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == [], f"{len(alive)} of {len(refs)} tensors read are still referenced"


def test_full_stream_yields_each_tensor_once(tmp_path: Path, read_tensors: list[weakref.ref[torch.Tensor]]) -> None:
    plan, _, _ = make_plan(tmp_path)
    names = consume(loader.stream_plan(plan, torch.bfloat16, progress=False))
    assert sorted(names) == sorted(f"{p}.{i}.weight" for p in "ab" for i in range(PER_SHARD))
    assert_released(read_tensors)


@pytest.mark.parametrize("damage", ["reshaped", "not-in-header", "truncated"])
def test_damaged_shard_mid_stream(tmp_path: Path, read_tensors: list[weakref.ref[torch.Tensor]], damage: str) -> None:
    plan, _, b = make_plan(tmp_path, ghost=damage == "not-in-header")
    order = in_file_order(b)  # the reader's order: the fault comes after most of b was read
    if damage == "reshaped":
        write_shard(b, "b", reshaped=order[-2].name)
        assert [t.start for t in in_file_order(b)] == [t.start for t in order]
        expected = (
            f"tensor {order[-2].name!r} has shape [{COLS}, {ROWS}] but [{ROWS}, {COLS}] when the load was planned"
        )
    elif damage == "not-in-header":
        expected = "read failed at tensor 'b.ghost.weight'"
    else:
        b.write_bytes(b.read_bytes()[: order[-3].end - 100])
        expected = f"truncated: tensor {order[-3].name!r} ends at byte {order[-3].end} but the file now holds only"
    stream = loader.stream_plan(plan, torch.bfloat16, progress=False)
    with pytest.raises(MixedError) as failed:
        consume(stream)
    error = failed.value  # held on purpose: its traceback must not keep tensors alive
    assert str(error).startswith(f"{b}: "), error
    assert expected in str(error)
    assert len(read_tensors) > 0
    assert_released(read_tensors)
    assert error.__traceback__ is not None


@pytest.mark.parametrize("how", ["closed", "consumer-raised"])
def test_consumer_stopping_early(tmp_path: Path, read_tensors: list[weakref.ref[torch.Tensor]], how: str) -> None:
    """What ``MixedModelLoader.load_weights`` does: close the stream however
    ``model.load_weights`` ended."""
    plan, _, _ = make_plan(tmp_path)
    stream = loader.stream_plan(plan, torch.bfloat16, progress=False)
    if how == "closed":
        assert len(consume(stream, limit=3)) == 3
        assert reader_threads() != []  # readers are blocked on the full queue
        stream.close()
    else:
        with pytest.raises(RuntimeError, match="model rejected"):
            try:
                consume(stream, limit=3)
                raise RuntimeError("model rejected a weight")
            finally:
                stream.close()
    assert_released(read_tensors)


def test_every_dtype_reads_as_safe_open_does(tmp_path: Path) -> None:
    """The loader's own reads (views of one buffer per run) give safe_open's
    tensors bit for bit, for every safetensors dtype, a scalar, an empty
    tensor and tensors left unaligned by an odd-sized one."""
    from safetensors import safe_open

    from tests.test_safetensors_header import random_tensor

    dtypes = [torch.bool, torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2, torch.int16, torch.uint16,
              torch.float16, torch.bfloat16, torch.int32, torch.uint32, torch.float32, torch.int64, torch.uint64,
              torch.float64]  # fmt: skip
    assert {str(d).removeprefix("torch.") for d in dtypes} == {
        str(d).removeprefix("torch.") for d in loader.TORCH_DTYPES.values()
    }
    tensors = {f"t.{i}": random_tensor(dt, (3, 5)) for i, dt in enumerate(dtypes)}
    tensors.update({"scalar": torch.randn(()), "empty": torch.randn(0, 7), "odd": random_tensor(torch.int8, (7,))})
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    streamed = dict(loader.stream_plan(plan_of(list(read_header(path).values())), torch.bfloat16, progress=False))
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            want = f.get_tensor(name)
            assert streamed[name].dtype == want.dtype and streamed[name].shape == want.shape, name
            assert torch.equal(streamed[name].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def test_unaligned_offsets(tmp_path: Path) -> None:
    """A writer that does not align tensors (a 3-byte tensor, then float32
    and int64 at odd offsets): each tensor still holds its own bytes."""
    import json
    import struct

    import numpy as np

    parts = {"a.u8": np.arange(3, dtype=np.uint8), "b.f32": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
             "c.i64": np.array([2**40 + 7, -5], dtype=np.int64)}  # fmt: skip
    names = {"a.u8": "U8", "b.f32": "F32", "c.i64": "I64"}
    header, data = {}, b""
    for name, arr in parts.items():
        header[name] = {
            "dtype": names[name],
            "shape": list(arr.shape),
            "data_offsets": [len(data), len(data) + arr.nbytes],
        }
        data += arr.tobytes()
    raw = json.dumps(header).encode()
    path = tmp_path / "unaligned.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    infos = read_header(path)
    assert infos["b.f32"].start % 4 and infos["c.i64"].start % 8  # the case under test
    streamed = dict(loader.stream_plan(plan_of(list(infos.values())), torch.bfloat16, progress=False))
    for name, arr in parts.items():
        assert np.array_equal(streamed[name].numpy(), arr), name


def test_reads_exactly_the_planned_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning every other tensor of a shard: the loader's reads cover
    exactly those tensors' bytes, in runs no larger than ``CHUNK_BYTES``,
    and readahead is turned off for the file."""
    path = tmp_path / "a.safetensors"
    write_shard(path, "a")
    order = in_file_order(path)
    wanted = order[:4] + order[6::2]  # 0-3 back to back (two reads at 3 MiB a read), then every other one
    reads: list[tuple[int, int]] = []
    advice: list[int] = []
    preadv, fadvise = os.preadv, os.posix_fadvise

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = preadv(fd, buffers, offset)
        reads.append((offset, n))
        return n

    monkeypatch.setattr(os, "preadv", counting)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: (advice.append(how), fadvise(fd, off, n, how)))
    monkeypatch.setattr(loader, "CHUNK_BYTES", 3 * ROWS * COLS * 4)
    names = [n for n, _ in loader.stream_plan(plan_of(wanted), torch.bfloat16, progress=False)]
    assert sorted(names) == sorted(t.name for t in wanted)
    planned = sorted((t.start, t.end) for t in wanted)
    covered = sorted((off, off + n) for off, n in reads)
    assert sum(n for _, n in reads) == sum(e - s for s, e in planned)
    assert all(any(s <= ps and pe <= e for s, e in covered) for ps, pe in planned)
    assert max(n for _, n in reads) <= loader.CHUNK_BYTES
    assert len(reads) < len(planned)  # neighbours were read together
    assert advice and set(advice) == {os.POSIX_FADV_RANDOM}  # the data reads and the header re-check


def test_file_ending_during_a_read(
    tmp_path: Path, read_tensors: list[weakref.ref[torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard that ends while it is being read (the size check before the
    read passed): the read comes back short, and the error names the tensor
    whose bytes are missing."""
    plan, _, b = make_plan(tmp_path)
    order = in_file_order(b)
    cut = order[5].start + 1000  # inside b's sixth tensor
    preadv = os.preadv

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        if os.path.realpath(f"/proc/self/fd/{fd}") != str(b.resolve()):
            return preadv(fd, buffers, offset)
        return 0 if offset >= cut else preadv(fd, [buffers[0][: cut - offset]], offset)

    monkeypatch.setattr(os, "preadv", short)
    with pytest.raises(MixedError) as failed:
        consume(loader.stream_plan(plan, torch.bfloat16, progress=False))
    assert str(failed.value).startswith(f"{b}: truncated: tensor {order[5].name!r} ends at byte {order[5].end}")
    assert f"but the file ends at byte {cut}" in str(failed.value)
    assert_released(read_tensors)


def test_completeness_check_allows_only_vllms_unread_index_buffers() -> None:
    """After ``load_weights`` every parameter must have been loaded, except
    the index buffers vLLM registers and fills itself when a checkpoint has
    no act-order (vLLM 0.26's compressed-tensors WNA16 MoE methods register
    ``w13_weight_g_idx`` / ``w2_weight_g_idx`` on every W4A16 expert layer):
    those are allowed missing, a missing weight is a clear error."""
    experts = torch.nn.Module()
    for name in ("w13_weight_packed", "w2_weight_packed", "w13_weight_g_idx", "w2_weight_g_idx"):
        experts.register_parameter(name, torch.nn.Parameter(torch.zeros(2, 4, dtype=torch.int32), requires_grad=False))
    model = torch.nn.Module()
    model.add_module("experts", experts)
    loader.MixedModelLoader._check_complete(model, {"experts.w13_weight_packed", "experts.w2_weight_packed"})
    with pytest.raises(MixedError, match=r"1 model parameters were not loaded: experts\.w2_weight_packed"):
        loader.MixedModelLoader._check_complete(model, {"experts.w13_weight_packed"})
