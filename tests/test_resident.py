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


@pytest.mark.parametrize("k,n,group", [(256, 1024, 128), (256, 1024, 64), (256, 1024, 32), (512, 256, 512),
                                       (2048, 768, 128), (768, 2048, 128)])  # fmt: skip
def test_w4a8_repack_bytes_are_what_vllms_repack_returns(k, n, group):
    """The prediction of a 4-bit layer's bytes after vLLM's W4A8 repack
    (``cpu_kernels.w4a8_bytes``: the experts always, AMX linears) against
    the tensors vLLM's own ``convert_weight_packed_scale_zp`` returns, for
    the group sizes the int4 formats publish (Qwen3-30B-A3B's expert shapes
    among them)."""
    ops = pytest.importorskip("vllm._custom_ops")
    if not hasattr(ops, "convert_weight_packed_scale_zp") or not hasattr(
        torch.ops._C, "convert_weight_packed_scale_zp"
    ):
        pytest.skip("this vLLM build has no CPU W4A8 repack")
    from vllm_mixed.cpu_kernels import w4a8_bytes

    words = torch.randint(0, 2**31 - 1, (k, n // 8), dtype=torch.int32)  # AWQ order, as vLLM hands it over
    zeros = torch.randint(0, 2**31 - 1, (k // group, n // 8), dtype=torch.int32)
    scales = torch.rand(k // group, n, dtype=torch.bfloat16)
    try:
        packed = ops.convert_weight_packed_scale_zp(words, zeros, scales, ops.CPUQuantAlgo.AWQ)
    except RuntimeError as exc:  # a build whose repack needs an ISA this CPU lacks
        pytest.skip(f"vLLM's CPU W4A8 repack does not run here: {exc}")
    assert sum(t.untyped_storage().nbytes() for t in packed) == w4a8_bytes(n, k, group)
