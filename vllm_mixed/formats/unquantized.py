"""Unquantized weights: ``weight`` [out, in] in bf16, fp16 or fp32 (any
checkpoint without a ``quantization_config``, and every layer a quantized
checkpoint leaves in float)."""

from __future__ import annotations

from typing import Any

import torch

from vllm_mixed.formats.base import Format, TensorSpec, TinyLayout

__all__ = ["FLOAT_DTYPES", "TORCH_DTYPES", "UNQUANTIZED"]

FLOAT_DTYPES = ("BF16", "F16", "F32")
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_WRITE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_LABEL = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class Unquantized(Format):
    name = "unquantized"
    quantized = False
    description = "none (unquantized)"
    tiny = TinyLayout("bf16", None, "bfloat16", "bf16")

    def precision(self, quant_config: dict[str, Any] | None, dtype: str = "bfloat16") -> str:
        return _LABEL.get(dtype, dtype)

    def specs(self, out_features: int, in_features: int, quant_config: dict[str, Any] | None) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec(FLOAT_DTYPES, (out_features, in_features))}

    def runtime_dtype(self, suffix: str, model_dtype: torch.dtype) -> torch.dtype | None:
        return model_dtype if suffix == "weight" else None

    def quantize(
        self, weight: torch.Tensor, quant_config: dict[str, Any] | None, dtype: str = "bfloat16", **_: Any
    ) -> dict[str, torch.Tensor]:
        return {"weight": weight.to(TORCH_DTYPES[_WRITE[dtype]]).contiguous()}

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        return tensors["weight"].to(dtype)


UNQUANTIZED = Unquantized()
