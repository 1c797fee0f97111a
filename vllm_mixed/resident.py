"""What a loaded model really holds in memory on vLLM's CPU build, measured
after ``process_weights_after_loading`` (the prediction is
``cpu_kernels.cpu_resident_bytes``).

``held``: every tensor the model's modules hold (parameters, buffers,
tensor-valued attributes of a module and of its quant method, tensors
captured by the GEMM closures vLLM's CPU build installs as ``cpu_linear``),
each storage counted once, plus the weight copies vLLM's CPU GEMM dispatch
keeps inside oneDNN handlers (``CPUDNNLGEMMHandler``: the weight reordered
into oneDNN's blocked layout, k x n elements of the model dtype; the
``Linear`` layers drop their own ``weight`` then, the vocabulary embeddings
keep it). Buffers that are not weights (rotary tables) are counted apart.

``heap`` and ``rss``: what the C allocator and the kernel say the load left
allocated / resident (growth from before the model was built to after its
weights were processed), the cross-check that ``held`` misses nothing big.
"""

from __future__ import annotations

import ctypes
import gc
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LOG_PATTERN", "ResidentExtension", "ResidentReport", "Snapshot", "held_bytes", "last_report", "snapshot"]

_LAST: dict[str, Any] = {}
LOG_PATTERN = re.compile(
    r"vllm-mixed: resident weights on this CPU: held (\d+) B \(tensors (\d+) B, oneDNN packed (\d+) B\), "
    r"non-weight buffers (\d+) B, heap growth (-?\d+|\?) B, RSS growth (-?\d+|\?) B; plan predicts (\d+) B"
)


@dataclass(frozen=True)
class Snapshot:
    heap: int | None  # bytes the C allocator has handed out and not taken back
    rss: int | None  # anonymous resident memory of this process


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def _libc() -> Any:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _heap_bytes() -> int | None:
    """glibc's allocated bytes (``mallinfo2``: in-use arena chunks plus
    mmapped blocks); ``None`` under another allocator (tcmalloc, as vLLM's
    CPU platform may preload) or without glibc >= 2.33."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
        if "libtcmalloc" in maps or "libjemalloc" in maps:
            return None
    except OSError:
        return None
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    info = fn()
    return int(info.uordblks + info.hblkhd)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def snapshot() -> Snapshot:
    """The heap and RSS now, after a garbage collection and (glibc) giving
    freed heap back to the system."""
    gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
    return Snapshot(_heap_bytes(), _rss_bytes())


@dataclass(frozen=True)
class ResidentReport:
    held: int  # tensors + packed: the weight bytes the model holds
    tensors: int
    packed: int
    buffers: int  # non-weight buffers (rotary tables), not in held
    heap_growth: int | None
    rss_growth: int | None
    predicted: int

    def line(self) -> str:
        def q(v: int | None) -> str:
            return "?" if v is None else str(v)

        return (
            f"vllm-mixed: resident weights on this CPU: held {self.held} B (tensors {self.tensors} B, oneDNN packed "
            f"{self.packed} B), non-weight buffers {self.buffers} B, heap growth {q(self.heap_growth)} B, RSS growth "
            f"{q(self.rss_growth)} B; plan predicts {self.predicted} B ({self.held / max(self.predicted, 1) - 1:+.2%})"
        )

    @classmethod
    def parse(cls, text: str) -> ResidentReport | None:
        """The last report line in a log, or ``None``."""
        found = LOG_PATTERN.findall(text)
        if not found:
            return None
        held, tensors, packed, buffers, heap, rss, predicted = found[-1]
        opt = lambda v: None if v == "?" else int(v)  # noqa: E731
        return cls(int(held), int(tensors), int(packed), int(buffers), opt(heap), opt(rss), int(predicted))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_bytes(model: Any, itemsize: int) -> tuple[int, int, int]:
    """(tensor bytes, oneDNN packed bytes, non-weight buffer bytes) the
    model's modules hold; ``itemsize``: the model dtype's, for the packed
    copies oneDNN makes of unquantized weights."""
    import torch
    from vllm import _custom_ops as ops

    handler_cls = getattr(ops, "CPUDNNLGEMMHandler", None)
    storages: dict[int, int] = {}
    handlers: dict[int, int] = {}
    buffers: dict[int, int] = {}

    def add(t: Any, into: dict[int, int]) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.nbytes():
                into.setdefault(s.data_ptr(), s.nbytes())
        elif handler_cls is not None and isinstance(t, handler_cls) and t.k > 0 and t.n > 0:
            handlers.setdefault(id(t), t.k * t.n * itemsize)

    for module in model.modules():
        for p in module.parameters(recurse=False):
            add(p, storages)
        for b in module.buffers(recurse=False):
            add(b, buffers)
        for owner in (module, getattr(module, "quant_method", None)):
            for value in vars(owner).values() if owner is not None else ():
                add(value, storages)
                for cell in getattr(value, "__closure__", None) or ():  # cpu_linear's packed weight or handler
                    try:
                        add(cell.cell_contents, storages)
                    except ValueError:  # an empty cell
                        pass
    non_weight = sum(n for ptr, n in buffers.items() if ptr not in storages)
    return sum(storages.values()), sum(handlers.values()), non_weight


def measure(model: Any, before: Snapshot, itemsize: int, predicted: int) -> ResidentReport:
    """The report on ``model`` against the :func:`snapshot` taken before it
    was built; kept for :class:`ResidentExtension`."""
    tensors, packed, buffers = held_bytes(model, itemsize)
    after = snapshot()
    grow = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
    report = ResidentReport(
        tensors + packed, tensors, packed, buffers, grow(after.heap, before.heap), grow(after.rss, before.rss),
        predicted,
    )  # fmt: skip
    _LAST.clear()
    _LAST.update(report.to_dict())
    return report


def last_report() -> dict[str, Any] | None:
    """This process's last report (``measure``), as plain data."""
    return dict(_LAST) or None


class ResidentExtension:
    """A vLLM worker extension (``LLM(..., worker_extension_cls=
    "vllm_mixed.resident.ResidentExtension")``): ``llm.collective_rpc(
    "vllm_mixed_resident")`` returns each worker's report (plain data)."""

    def vllm_mixed_resident(self) -> dict[str, Any] | None:
        return last_report()
