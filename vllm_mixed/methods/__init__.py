"""One precision = one row: the CPU method classes that dequantize after
loading, and the builder of vLLM's own config for the GPU. Adding a precision
is one module and one row in :data:`PRECISIONS`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRECISIONS", "Precision"]


@dataclass(frozen=True)
class Precision:
    cpu_linear: str  # class names in methods.cpu_dequant (imported lazily: vLLM)
    cpu_moe: str


PRECISIONS: dict[str, Precision] = {
    "fp8_block": Precision("CpuDequantFp8BlockLinearMethod", "CpuDequantFp8BlockMoEMethod"),
    "gptq_int4": Precision("CpuDequantGptqLinearMethod", "CpuDequantGptqMoEMethod"),
}
