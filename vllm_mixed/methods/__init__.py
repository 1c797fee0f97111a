"""One precision = one row: the CPU method classes that dequantize after
loading, and the builder of vLLM's own config for the GPU. Adding a precision
is one module and one row in :data:`PRECISIONS`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRECISIONS", "Precision", "predicted_methods"]


@dataclass(frozen=True)
class Precision:
    cpu_linear: str  # class names in methods.cpu_dequant (imported lazily: vLLM)
    cpu_moe: str
    gpu_linear: str  # the vLLM method its sub-config hands out (what `plan` predicts)
    gpu_moe: str


PRECISIONS: dict[str, Precision] = {
    "fp8_block": Precision(
        "CpuDequantFp8BlockLinearMethod", "CpuDequantFp8BlockMoEMethod", "Fp8LinearMethod", "Fp8MoEMethod"
    ),
    "gptq_int4": Precision(
        "CpuDequantGptqLinearMethod", "CpuDequantGptqMoEMethod", "AutoGPTQLinearMethod", "AutoGPTQMoEMethod"
    ),
}

# what vLLM runs for layers that stay unquantized, by layer kind
UNQUANTIZED_METHODS = {
    "linear": "UnquantizedLinearMethod",
    "router": "UnquantizedLinearMethod",
    "experts": "UnquantizedFusedMoEMethod",
}


def predicted_methods(kind: str, fmt: str) -> tuple[str, str]:
    """(GPU method, CPU method) vLLM will run for a layer kind and format;
    "-" where vLLM uses no quantization method (embeddings, norms)."""
    if fmt == "unquantized" or kind not in ("linear", "experts"):
        name = UNQUANTIZED_METHODS.get(kind, "-")
        return name, name
    row = PRECISIONS[fmt]
    return (row.gpu_moe, row.cpu_moe) if kind == "experts" else (row.gpu_linear, row.cpu_linear)
