"""The GPU path: vLLM's own FP8 and GPTQ configs, built once from each
source's own ``quantization_config``, hand out vLLM's own methods (FP8 block
GEMM / FP8 MoE, Machete or Marlin int4 linears, Marlin MoE). Nothing is
wrapped or renamed: vLLM checks these classes by type and by name."""

from __future__ import annotations

from typing import Any

__all__ = ["build_native_config"]


def build_native_config(fmt: str, quant_config: dict[str, Any], quantized_modules: list[str]) -> Any:
    """A real ``Fp8Config`` / ``AutoGPTQConfig`` for one source."""
    if fmt == "fp8_block":
        from vllm.model_executor.layers.quantization.fp8 import Fp8Config

        return Fp8Config.from_config(dict(quant_config))
    if fmt == "gptq_int4":
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

        # vLLM fills modules_in_block_to_quantize from safetensors dtypes in
        # maybe_update_config, which is never called for a sub-config; the
        # MoE-WNA16 fallback needs quant_method in the dict.
        cfg = {**quant_config, "quant_method": "gptq", "modules_in_block_to_quantize": list(quantized_modules)}
        return AutoGPTQConfig.from_config(cfg)
    raise ValueError(f"no vLLM config for format {fmt!r}")
