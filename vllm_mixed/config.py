"""``MixedPrecisionConfig``: vLLM's quantization config named ``mixed``. It
routes each layer to the method of the precision its source holds.

Built once in vLLM's front-end process (``from_config``) and pickled into
every worker, so everything is parsed up front and dispatch is a pure
function of (layer, prefix).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from vllm_mixed import methods as methods_table
from vllm_mixed.composition import QUANT_METHOD, Composition
from vllm_mixed.errors import MixedError
from vllm_mixed.vllm_compat import is_cpu, routed_experts_cls

__all__ = ["MixedPrecisionConfig"]

logger = init_logger("vllm.vllm_mixed")


class MixedPrecisionConfig(QuantizationConfig):
    """Per-layer precision from several checkpoints (see ``vllm-mixed compose``)."""

    def __init__(self, composition: Composition | None = None):
        super().__init__()
        self.composition = composition
        # vLLM's own configs, one per quantized source, built once (GPU path)
        self.native: dict[str, Any] = {}
        if composition is not None and not is_cpu():
            from vllm_mixed.methods.vllm_native import build_native_config

            for name, src in composition.sources.items():
                if src.format in methods_table.PRECISIONS and src.quantization_config:
                    native = build_native_config(
                        src.format, src.quantization_config, composition.quantized_modules(name)
                    )
                    # share (not copy) the mapping the model fills in at init
                    native.packed_modules_mapping = self.packed_modules_mapping
                    self.native[name] = native
        self._logged: set[tuple[str, str, str]] = set()

    def __repr__(self) -> str:
        n = len(self.composition.layers) if self.composition else 0
        return f"MixedPrecisionConfig({n} layers)"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # what vLLM's GPTQ/FP8 (Marlin fallback) need; each method checks its own

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MixedPrecisionConfig:
        return cls(Composition.from_dict(config))

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Let ``--quantization mixed`` win over a checkpoint's own config."""
        return QUANT_METHOD if user_quant == QUANT_METHOD else None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        for native in self.native.values():
            native.apply_vllm_mapper(hf_to_vllm_mapper)

    def _require(self) -> Composition:
        if self.composition is None:
            raise MixedError(
                "quantization 'mixed' has no recipe: the model directory has no quantization_config of quant_method "
                "'mixed'. Serve a directory written by `vllm-mixed compose RECIPE -o DIR`, or pass "
                '--hf-overrides \'{"quantization_config": {"quant_method": "mixed", "recipe": "/abs/recipe.yaml"}}\''
            )
        return self.composition

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Any:
        experts = isinstance(layer, routed_experts_cls())
        if not experts and not isinstance(layer, LinearBase):
            return None  # attention, embeddings, lm_head: unquantized in every source
        source, fmt = self._require().route(prefix)
        if fmt == "unquantized":
            method = None if experts else UnquantizedLinearMethod()
        elif is_cpu():
            from vllm_mixed.methods import cpu_dequant

            row = methods_table.PRECISIONS[fmt]
            qc = self.composition.sources[source].quantization_config or {}
            method = (
                getattr(cpu_dequant, row.cpu_moe)(layer.moe_config, qc)
                if experts
                else getattr(cpu_dequant, row.cpu_linear)(qc)
            )
        else:
            method = self.native[source].get_quant_method(layer, prefix)
        self._log(prefix, source, fmt, method)
        return method

    def _log(self, prefix: str, source: str, fmt: str, method: Any) -> None:
        group = prefix.split(".")[-1] if prefix.startswith("model.layers.") else prefix
        kind = type(method).__name__ if method is not None else "UnquantizedFusedMoEMethod"
        key = (group, source, kind)
        if key not in self._logged:
            self._logged.add(key)
            logger.info("vllm-mixed: %s <- source %r (%s) via %s", group, source, fmt, kind)
