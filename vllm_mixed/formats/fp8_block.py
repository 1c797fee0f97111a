"""Block-scaled FP8, as in Qwen/Qwen3-*-FP8 and DeepSeek-V3.

Each quantized linear stores ``weight`` (float8_e4m3fn, [out, in]) and
``weight_scale_inv`` ([ceil(out/bn), ceil(in/bk)], fp32 or bf16). Despite its
name the scale multiplies: real weight = weight * scale, broadcast over each
bn x bk block.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vllm_mixed.formats.base import TensorSpec

__all__ = ["FP8_BLOCK", "block_size", "expand_block_scale"]

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def block_size(quant_config: dict[str, Any] | None) -> tuple[int, int]:
    block = (quant_config or {}).get("weight_block_size") or [128, 128]
    return int(block[0]), int(block[1])


def expand_block_scale(
    scale: torch.Tensor, out_features: int, in_features: int, block: tuple[int, int]
) -> torch.Tensor:
    """[..., ceil(out/bn), ceil(in/bk)] -> [..., out, in] by repeating each block's scale."""
    bn, bk = block
    full = scale.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
    return full[..., :out_features, :in_features]


class Fp8Block:
    name = "fp8_block"

    def precision(self, quant_config: dict[str, Any] | None) -> str:
        bn, bk = block_size(quant_config)
        return f"fp8-block{bn}x{bk}"

    def specs(self, out_features: int, in_features: int, quant_config: dict[str, Any] | None) -> dict[str, TensorSpec]:
        bn, bk = block_size(quant_config)
        return {
            "weight": TensorSpec(("F8_E4M3",), (out_features, in_features)),
            "weight_scale_inv": TensorSpec(
                ("BF16", "F32"), (math.ceil(out_features / bn), math.ceil(in_features / bk))
            ),
        }

    def quantize(
        self, weight: torch.Tensor, quant_config: dict[str, Any] | None, scale_dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, torch.Tensor]:
        """Per-block amax scaling; the scale is rounded to ``scale_dtype`` first
        so that weight * stored scale is the exact dequantization."""
        out_features, in_features = weight.shape
        bn, bk = block_size(quant_config)
        w = weight.to(torch.float32)
        rows, cols = math.ceil(out_features / bn), math.ceil(in_features / bk)
        padded = torch.zeros(rows * bn, cols * bk, dtype=torch.float32)
        padded[:out_features, :in_features] = w
        amax = padded.view(rows, bn, cols, bk).abs().amax(dim=(1, 3))
        scale = (amax / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
        full = expand_block_scale(scale.to(torch.float32), out_features, in_features, (bn, bk))
        q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"weight": q.contiguous(), "weight_scale_inv": scale.contiguous()}

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        w = tensors["weight"]
        out_features, in_features = w.shape[-2:]
        scale = expand_block_scale(
            tensors["weight_scale_inv"].to(dtype), out_features, in_features, block_size(quant_config)
        )
        return w.to(dtype) * scale


FP8_BLOCK = Fp8Block()
