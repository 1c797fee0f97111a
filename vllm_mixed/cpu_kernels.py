"""On vLLM's CPU build: which quantized layers run on vLLM's own method for
their format, and which on the dequantizing fallback. The question is asked
of vLLM's own kernel checks through each format (``Format.cpu_kernel``), per
layer kind, the same way for the engine and for ``plan``'s prediction.

``VLLM_MIXED_CPU_FALLBACK=1`` sends every quantized layer to the fallback:
meant for tests (the float-reference check of the fallback on a CPU that
has the kernels) and for comparing the two paths.
"""

from __future__ import annotations

import json
import math
import os
from functools import cache
from typing import TYPE_CHECKING, Any

from vllm_mixed.formats import get_format

if TYPE_CHECKING:
    from vllm_mixed.plan import LoadPlan

__all__ = [
    "FALLBACK_ENV", "cpu_fallback_reason", "cpu_method_name", "cpu_resident_bytes", "int4_repacked", "onednn_packs",
    "w4a8_bytes",
]  # fmt: skip

FALLBACK_ENV = "VLLM_MIXED_CPU_FALLBACK"
FALLBACK_METHODS = {"linear": "DequantFallbackLinearMethod", "experts": "DequantFallbackMoEMethod"}


def cpu_fallback_reason(fmt: str, kind: str, quant_config: dict[str, Any] | None) -> str | None:
    """Why a ``kind`` layer of format ``fmt`` is dequantized on this CPU, or
    ``None`` when vLLM's own method runs it."""
    if not get_format(fmt).quantized:
        return None
    if os.environ.get(FALLBACK_ENV, "") not in ("", "0"):
        return f"{FALLBACK_ENV}={os.environ[FALLBACK_ENV]}"
    return _reason(fmt, kind, json.dumps(quant_config or {}, sort_keys=True))


@cache
def _reason(fmt: str, kind: str, quant_config: str) -> str | None:
    return get_format(fmt).cpu_kernel(kind, json.loads(quant_config))


def cpu_method_name(fmt: str, kind: str, quant_config: dict[str, Any] | None) -> str:
    """The method the CPU build runs for a layer (what ``plan`` shows):
    vLLM's own (``plan.predicted_methods``) unless the layer falls back."""
    from vllm_mixed.plan import predicted_methods

    if kind in FALLBACK_METHODS and cpu_fallback_reason(fmt, kind, quant_config) is not None:
        return FALLBACK_METHODS[kind]
    return predicted_methods(kind, fmt)[1]


def cpu_resident_bytes(plan: LoadPlan) -> int:
    """The weight bytes the CPU build holds for a plan (what
    ``vllm_mixed.resident`` measures after loading): a layer vLLM runs
    natively keeps the bytes the plan reads for it (its kernel may drop a
    little: the GPTQ linear's symmetric zero points and ``g_idx``), except
    4-bit weights vLLM repacks for its W4A8 kernels (:func:`w4a8_bytes`),
    a dequantized one and every float layer its elements in the model dtype,
    and the vocabulary embeddings twice where vLLM's CPU GEMM dispatch packs
    them (it keeps their weight for the lookup and a packed copy for the
    GEMM, on ``embed_tokens`` as on ``lm_head``)."""
    itemsize = 2 if plan.recipe.dtype in ("bfloat16", "float16") else 4
    embedding_copies = 2 if onednn_packs(plan.recipe.dtype) else 1
    total = 0
    for p in plan.layers:
        qc = plan.sources[p.source].quant_config
        native = p.fmt.quantized and cpu_fallback_reason(p.format, p.layer.kind, qc) is None
        groups = [p.fmt.int4_group_length(qc or {}, m.shape[1]) for m in p.layer.members] if native else []
        if not native:
            size = itemsize * sum(math.prod(m.shape) for m in p.layer.members)
        elif all(groups) and int4_repacked(p.layer.kind, plan.recipe.dtype):
            size = sum(w4a8_bytes(*m.shape, g) + 4 * m.shape[0] * m.bias for m, g in zip(p.layer.members, groups))
        else:
            size = p.nbytes
        total += size * (embedding_copies if p.layer.kind in ("embedding", "lm_head") and not native else 1)
    return total


def int4_repacked(kind: str, dtype: str) -> bool:
    """Whether vLLM's CPU build repacks a native 4-bit ``kind`` layer for its
    W4A8 kernels: the MoE experts always (``CPUExpertsInt4`` has no other
    path), a linear where ``CPUWNA16LinearKernel`` takes it (bf16
    activations, AMX or RISC-V, ``VLLM_CPU_INT4_W4A8`` not 0); elsewhere the
    linear keeps the GPTQ words (its W4A16 path) and the bias in the model
    dtype (the W4A8 path holds it in float32)."""
    if kind == "experts":
        return True
    try:
        import torch
        from vllm import envs
        from vllm.platforms import CpuArchEnum, current_platform
    except ImportError:
        return False
    riscv = current_platform.get_cpu_architecture() == CpuArchEnum.RISCV
    return bool(envs.VLLM_CPU_INT4_W4A8) and dtype == "bfloat16" and (torch.cpu._is_amx_tile_supported() or riscv)


def w4a8_bytes(n: int, k: int, group: int) -> int:
    """The bytes of an ``n`` x ``k`` 4-bit weight with ``group``-input scale
    groups after vLLM's W4A8 repack (``convert_weight_packed_scale_zp``,
    measured on AMX): tiles of 32 outputs x min(group, 128) inputs, each the
    nibbles plus 32 int32 column sums, and per group and output a float32
    scale and an int8 zero point (symmetric weights get one too)."""
    rows = min(group, 128)
    tiles = math.ceil(n / 32) * math.ceil(k / rows)
    return tiles * (32 * rows // 2 + 128) + math.ceil(k / group) * math.ceil(n / 32) * 32 * 5


@cache
def onednn_packs(dtype: str) -> bool:
    """Whether vLLM's CPU GEMM dispatch (``dispatch_cpu_unquantized_gemm``,
    which the vocabulary embeddings' method calls with ``remove_weight=False``)
    makes a packed oneDNN copy of a large ``dtype`` weight here: with oneDNN
    (x86, Arm) it does, unless oneDNN refuses the dtype on this CPU (bf16 on an
    AVX2-only x86), where vLLM catches the error and keeps the plain weight alone."""
    try:
        import torch
        from vllm import _custom_ops as ops
    except ImportError:
        return False
    if not getattr(ops, "_supports_onednn", False):
        return False
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    try:  # as vLLM's dispatch does; a 64 x 64 handler is freed at once
        ops.create_onednn_mm(torch.zeros(64, 64, dtype=torch_dtype).t(), 32)
    except RuntimeError:
        return False
    return True
