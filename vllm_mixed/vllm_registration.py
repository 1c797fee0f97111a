"""Registers the ``mixed`` quantization config and load format with vLLM's
public registries (no monkeypatching). Called by ``vllm_mixed.register``."""

from __future__ import annotations

__all__ = ["register_with_vllm"]


def register_with_vllm() -> None:
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader

    from vllm_mixed.composition import QUANT_METHOD
    from vllm_mixed.config import MixedPrecisionConfig
    from vllm_mixed.loader import MixedModelLoader

    register_quantization_config(QUANT_METHOD)(MixedPrecisionConfig)
    register_model_loader(QUANT_METHOD)(MixedModelLoader)
