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

__all__ = ["FALLBACK_ENV", "cpu_fallback_reason", "cpu_method_name", "cpu_resident_bytes", "onednn_packs"]

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
    little: the GPTQ linear's symmetric zero points and ``g_idx``), a
    dequantized one and every float layer its elements in the model dtype,
    and the vocabulary embeddings twice where vLLM's CPU GEMM dispatch packs
    them (it keeps their weight for the lookup and a packed copy for the
    GEMM, on ``embed_tokens`` as on ``lm_head``)."""
    itemsize = 2 if plan.recipe.dtype in ("bfloat16", "float16") else 4
    embedding_copies = 2 if onednn_packs(plan.recipe.dtype) else 1
    total = 0
    for p in plan.layers:
        native = (
            p.fmt.quantized and cpu_fallback_reason(p.format, p.layer.kind, plan.sources[p.source].quant_config) is None
        )
        size = p.nbytes if native else itemsize * sum(math.prod(m.shape) for m in p.layer.members)
        total += size * (embedding_copies if p.layer.kind in ("embedding", "lm_head") and not native else 1)
    return total


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
