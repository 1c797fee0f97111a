"""GPTQ 8-bit in the v1 checkpoint layout (``bits: 8``; AutoGPTQ / GPTQModel),
read by vLLM's ``AutoGPTQConfig`` as ``uint8b128``: Machete or Marlin linears
and Marlin MoE on CUDA. Four 8-bit values per int32 word (lowest byte
first) along K in ``qweight`` [K/4, N] and along N in ``qzeros`` [K/g, N/4];
a symmetric checkpoint's qzeros words are 0x7f7f7f7f (zero point 128, stored
minus one). Everything else, act-order included, is :mod:`gptq_int4`'s.
vLLM's CPU build has no 8-bit GEMM (CPUWNA16LinearKernel is 4-bit only):
there every layer runs on the dequantizing fallback."""

from __future__ import annotations

from typing import Any

from vllm_mixed.formats.base import TinyLayout
from vllm_mixed.formats.gptq_int4 import GPTQ_METHODS, GPTQ_QUANT_CONFIG, GptqInt4

__all__ = ["GPTQ_INT8", "GPTQ_INT8_QUANT_CONFIG"]

# GPTQModel's 8-bit config (e.g. Qwen2.5-*-GPTQ-Int8), as GPTQ_QUANT_CONFIG with bits 8
GPTQ_INT8_QUANT_CONFIG: dict[str, Any] = {**GPTQ_QUANT_CONFIG, "bits": 8}


class GptqInt8(GptqInt4):
    name = "gptq_int8"
    description = "gptq (8-bit)"
    tiny = TinyLayout("gptq-int8", GPTQ_INT8_QUANT_CONFIG, "float16", "int8")
    bits = 8

    def claims(self, quant_config: dict[str, Any]) -> bool:
        return str(quant_config.get("quant_method", "")).lower() in GPTQ_METHODS and quant_config.get("bits") == 8


GPTQ_INT8 = GptqInt8()
