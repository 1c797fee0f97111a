"""``vllm_mixed.resident`` on real vLLM CPU objects: the bytes it counts for a
module (its tensors, and the oneDNN handler vLLM's CPU GEMM dispatch hides in
a closure) against what the C heap says was allocated for them, and its log
line read back."""

from __future__ import annotations

import pytest
import torch

from vllm_mixed import resident
from vllm_mixed.cpu_kernels import onednn_packs


def _onednn():
    ops = pytest.importorskip("vllm._custom_ops")
    if not getattr(ops, "_supports_onednn", False):
        pytest.skip("this vLLM build has no oneDNN GEMM")
    return ops


def test_oneDNN_packed_copy_is_counted_as_the_heap_grows():
    """A module as vLLM's CPU dispatch leaves an unquantized linear: its
    weight dropped, a oneDNN handler (a packed copy) captured by
    ``cpu_linear``; plus a buffer and a plain tensor attribute."""
    ops = _onednn()
    if resident.snapshot().heap is None:
        pytest.skip("no glibc mallinfo2 here (another allocator)")
    n, k = 2048, 1024
    # bf16 as vLLM serves it; where oneDNN has no bf16 matmul (an AVX2-only CPU) vLLM's dispatch catches the
    # error and the same handler then only exists for fp32 weights, so the count is checked on those
    dtype = torch.bfloat16 if onednn_packs("bfloat16") else torch.float32
    size = torch.finfo(dtype).bits // 8
    before = resident.snapshot()
    module = torch.nn.Module()
    weight = torch.randn(n, k, dtype=dtype)
    handler = ops.create_onednn_mm(weight.t(), 32)
    del weight
    module.cpu_linear = lambda x, w, b: ops.onednn_mm(handler, x, b)
    module.register_buffer("cos_sin_cache", torch.zeros(4096, dtype=torch.float32), persistent=False)
    module.scales = torch.ones(64, 256, dtype=torch.bfloat16)
    module.view_of_scales = module.scales[:8]  # one storage: counted once
    report = resident.measure(module, before, itemsize=size, predicted=n * k * size + 64 * 256 * 2)
    assert report.packed == n * k * size
    assert report.tensors == 64 * 256 * 2
    assert report.buffers == 4096 * 4
    assert report.held == report.predicted
    # the heap grew by what was counted (oneDNN's reorder of the weight), give or take its own small objects
    assert 0 <= report.heap_growth - report.held - report.buffers <= 256 * 1024, report


def test_report_line_round_trips():
    report = resident.ResidentReport(120, 100, 20, 7, None, 130, 118)
    back = resident.ResidentReport.parse("INFO noise\n(Worker) INFO " + report.line() + "\nmore")
    assert back == report
    assert resident.ResidentReport.parse("no such line") is None
