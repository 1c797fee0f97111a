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
from vllm_mixed import tp_constraints
from vllm_mixed.architectures import MODEL_KEYS, layers_for
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
        self._shards_checked: set[Any] = set()

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
        if self.composition is not None and not self._shards_checked and not is_cpu():
            self.check_shards(*_engine_layout())  # first call: before any weight exists
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

    def check_shards(
        self, cfg: dict[str, Any] | None, parallel: tp_constraints.Parallel, dtype: str, capability: int | None
    ) -> None:
        """Refuse a parallel layout whose shards vLLM's kernels reject, with
        the message `plan --tp N` gives (rules in ``tp_constraints``). Runs on
        the first get_quant_method call of a process on CUDA: vLLM builds
        ``embed_tokens`` first, so no weight has been allocated yet."""
        key = (parallel, dtype, capability)
        if cfg is None or key in self._shards_checked:
            return
        self._shards_checked.add(key)
        comp = self._require()
        try:  # compose validated this config; a reading problem here must not block serving
            layers = layers_for(cfg, "the served model's config")
        except MixedError as exc:
            logger.warning("vllm-mixed: tensor-parallel shards not checked: %s", exc)
            return
        routed = [
            tp_constraints.Routed(
                layer, *comp.layers[layer.name], comp.sources[comp.layers[layer.name][0]].quantization_config
            )
            for layer in layers
            if layer.name in comp.layers
        ]
        others = {n: (s.format, s.quantization_config) for n, s in comp.sources.items()}
        checks = tp_constraints.check_layers(
            cfg, routed, parallel, dtype=dtype, capability=capability or tp_constraints.HOPPER, sources=others
        )
        for c in checks:
            if c.status == tp_constraints.FALLBACK:
                logger.info("vllm-mixed: at %s, %s", parallel, c.fallback_note)
        tp_constraints.raise_on_failures(checks, parallel)

    def _log(self, prefix: str, source: str, fmt: str, method: Any) -> None:
        group = prefix.split(".")[-1] if prefix.startswith("model.layers.") else prefix
        kind = type(method).__name__ if method is not None else "UnquantizedFusedMoEMethod"
        key = (group, source, kind)
        if key not in self._logged:
            self._logged.add(key)
            logger.info("vllm-mixed: %s <- source %r (%s) via %s", group, source, fmt, kind)


def _engine_layout() -> tuple[dict[str, Any] | None, tp_constraints.Parallel, str, int | None]:
    """(model config.json, parallel layout, activation dtype, GPU capability)
    of the engine building the model; no config outside model construction."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.platforms import current_platform

    vc = get_current_vllm_config_or_none()
    if vc is None or vc.model_config is None:
        return None, tp_constraints.Parallel(), "bfloat16", None
    pc = vc.parallel_config
    parallel = tp_constraints.Parallel(
        tp=pc.tensor_parallel_size,
        ep=bool(pc.enable_expert_parallel),
        # the MoE flattens data- and prefill-context-parallel ranks into its TP group
        dp=pc.data_parallel_size * getattr(pc, "prefill_context_parallel_size", 1),
    )
    text = vc.model_config.hf_text_config
    cfg = text.to_dict()
    # to_dict keeps transformers' canonical names; read the config.json names through its aliases
    for key in (*MODEL_KEYS, "decoder_sparse_step", "mlp_only_layers"):
        if getattr(text, key, None) is not None:
            cfg[key] = getattr(text, key)
    cfg.setdefault("architectures", list(getattr(vc.model_config, "architectures", None) or []))
    cap = current_platform.get_device_capability()
    dtype = str(vc.model_config.dtype).removeprefix("torch.")
    return cfg, parallel, dtype, cap.to_int() if cap is not None else None
