"""``MixedPrecisionConfig``: vLLM's quantization config named ``mixed``. It
routes each layer to the method of the format its source holds.

Built once in vLLM's front-end process (``from_config``) and pickled into
every worker, so everything is parsed up front and dispatch is a pure
function of (layer, prefix): the composition says the layer's source and
format, the format object says which vLLM config (built once per source)
hands out its method.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from vllm_mixed import tp_constraints
from vllm_mixed.composition import QUANT_METHOD, Composition
from vllm_mixed.cpu_kernels import cpu_fallback_reason
from vllm_mixed.errors import MixedError
from vllm_mixed.formats import get_format
from vllm_mixed.kernel_choice import (
    AUTO,
    RECIPE,
    KernelChoice,
    choose_linear_backend,
    choose_moe_backend,
    linear_backend_set,
)
from vllm_mixed.parallel import HOPPER, Parallel
from vllm_mixed.vllm_compat import (
    cpu_fp8_bias_as_float32,
    engine_layout,
    is_cpu,
    load_format_being_built,
    moe_backend_available,
    routed_experts_cls,
)  # fmt: skip

__all__ = ["MixedPrecisionConfig"]

logger = init_logger("vllm.vllm_mixed")

# load formats that read weights the plugin can serve: its own, and vLLM's random dummy weights
SERVING_LOAD_FORMATS = (QUANT_METHOD, "dummy")
LOAD_FORMAT_HINT = (
    "quantization 'mixed' reads its weights from the recipe's sources with the plugin's loader: add "
    '--load-format mixed (Python: LLM(..., load_format="mixed")); the composed directory holds no weights'
)


class MixedPrecisionConfig(QuantizationConfig):
    """Per-layer precision from several checkpoints (see ``vllm-mixed compose``)."""

    def __init__(self, composition: Composition | None = None):
        super().__init__()
        self.composition = composition
        # vLLM's own configs, one per quantized source, built once
        self.native: dict[str, Any] = {}
        if composition is not None:
            for name, src in composition.sources.items():
                fmt = get_format(src.format)
                if fmt.quantized and src.quantization_config:
                    native = fmt.vllm_config(src.quantization_config, composition.quantized_modules(name))
                    if native is not None:  # None: this vLLM has no method for it, every layer falls back
                        self.native[name] = native
        self._logged: set[tuple[str, str, str, str]] = set()
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
        composition = Composition.from_dict(config)
        _require_mixed_loader(load_format_being_built())  # in the front end: before any engine process starts
        return cls(composition)

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Let ``--quantization mixed`` win over a checkpoint's own config."""
        return QUANT_METHOD if user_quant == QUANT_METHOD else None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        for native in self.native.values():
            native.apply_vllm_mapper(hf_to_vllm_mapper)

    def get_checkpoint_weight_mapper(self) -> Any:
        """vLLM >= 0.27 drops every checkpoint ``.g_idx`` here; the plugin's
        loader yields exactly the tensors the layers load (``loader.unloadable``
        leaves out a ``g_idx`` no layer registered), and the act-order GPTQ
        fallback needs its ``g_idx``: nothing is dropped."""
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()

    def _require(self) -> Composition:
        if self.composition is None:
            raise MixedError(
                "quantization 'mixed' has no recipe: the model directory has no quantization_config of quant_method "
                "'mixed'. Serve a directory written by `vllm-mixed compose RECIPE -o DIR`, or pass "
                '--hf-overrides \'{"quantization_config": {"quant_method": "mixed", "recipe": "/abs/recipe.yaml"}}\''
            )
        return self.composition

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Any:
        if self.composition is not None and not self._shards_checked:
            self._first_layer()  # vLLM builds embed_tokens first: no weight has been allocated yet
        experts = isinstance(layer, routed_experts_cls())
        if not experts and not isinstance(layer, LinearBase):
            return None  # attention, embeddings, lm_head: unquantized in every source
        source, name = self._require().route(prefix)
        fmt = get_format(name)
        note = ""
        if not fmt.quantized:
            method = None if experts else UnquantizedLinearMethod()
        else:
            qc = self.composition.sources[source].quantization_config or {}
            why = cpu_fallback_reason(name, "experts" if experts else "linear", qc) if is_cpu() else None
            if why is None:
                native = self.native[source]
                # the model's fused-module mapping: SupportsQuant models fill this config's dict, others replace it
                native.packed_modules_mapping = self.packed_modules_mapping
                try:
                    if experts and not is_cpu():
                        method, note = self._native_experts(native, layer, prefix, source, fmt)
                    elif experts:
                        method = native.get_quant_method(layer, prefix)
                    else:
                        method, note = self._native_linear(native, layer, prefix, source)
                        if is_cpu() and method is not None:
                            cpu_fp8_bias_as_float32(method)
                except NotImplementedError as exc:  # vLLM found no kernel (e.g. its CPU WNA16 MoE oracle)
                    if not is_cpu():
                        raise
                    why = str(exc)
            if why is not None:
                from vllm_mixed.methods.dequant_fallback import DequantFallbackLinearMethod, DequantFallbackMoEMethod

                method = (
                    DequantFallbackMoEMethod(layer.moe_config, fmt, qc)
                    if experts
                    else DequantFallbackLinearMethod(fmt, qc)
                )
                note = f" (dequantized to the model dtype: {why})"
        self._log(prefix, source, name, method, note)
        return method

    def _native_experts(self, native: Any, layer: Any, prefix: str, source: str, fmt: Any) -> tuple[Any, str]:
        """vLLM's MoE method for these experts on the backend ``kernel_choice``
        picks: the layer's ``moe_config.moe_backend`` (vLLM reads it when the
        method selects its kernel) is set for this layer only. A backend vLLM
        refuses here falls back to its own choice unless the user named it."""
        moe = layer.moe_config
        layout = engine_layout()
        capability = layout.capability if layout is not None else None
        comp = self._require()
        qc = comp.sources[source].quantization_config
        choice = choose_moe_backend(fmt, source, comp.recipe, moe.moe_backend, capability, moe_backend_available, qc)
        moe.moe_backend = choice.backend
        try:
            method = native.get_quant_method(layer, prefix)
        except ValueError as exc:  # select_*_moe_backend: the requested backend does not support this layer
            if choice.binding or choice.backend == AUTO:
                raise
            moe.moe_backend = AUTO
            method = native.get_quant_method(layer, prefix)
            choice = KernelChoice(AUTO, choice.by, f"{choice.backend} refused by vLLM: {exc}")
        built = getattr(getattr(method, "experts_cls", None), "__name__", None)
        note = f" [moe backend {choice.describe()}{'; vLLM built ' + built if built else ''}]"
        return method, note

    def _native_linear(self, native: Any, layer: Any, prefix: str, source: str) -> tuple[Any, str]:
        """vLLM's method for this linear on the linear backend the recipe names
        for its source (``kernel_choice``): vLLM's ``kernel_config.linear_backend``
        holds it while the method is built and while it creates its weights,
        where vLLM picks the kernel; every other layer sees the engine's own."""
        from vllm.config import get_current_vllm_config

        kernel_config = get_current_vllm_config().kernel_config
        choice = choose_linear_backend(source, self._require().recipe, kernel_config.linear_backend)
        if choice.by != RECIPE:
            return native.get_quant_method(layer, prefix), ""

        def refused(exc: ValueError) -> Exception:
            if "linear-backend" not in str(exc):  # another fault of vLLM's: its own error
                return exc
            return MixedError(
                f"recipe {choice.detail}: vLLM has no {choice.backend!r} linear kernel for {prefix} ({exc}); name "
                "another backend for this source, or remove the key to let vLLM choose"
            )

        try:
            with linear_backend_set(kernel_config, choice.backend):
                method = native.get_quant_method(layer, prefix)
        except ValueError as exc:
            raise refused(exc) from None
        if method is not None:
            create = method.create_weights

            def create_weights(*args: Any, **kwargs: Any) -> Any:
                with linear_backend_set(kernel_config, choice.backend):
                    try:
                        return create(*args, **kwargs)
                    except ValueError as exc:
                        raise refused(exc) from None

            method.create_weights = create_weights  # the instance's own: isinstance checks still see vLLM's class
        return method, f" [linear backend asked: {choice.describe()}]"  # vLLM's own log names the kernel built

    def _first_layer(self) -> None:
        """Checks of the engine being built, once per process before any
        weight exists: the load format, and on CUDA the parallel layout."""
        layout = engine_layout()
        if layout is None:
            self._shards_checked.add(None)
            return
        _require_mixed_loader(layout.load_format)
        if not is_cpu():
            self.check_shards(layout.parallel, layout.dtype, layout.capability)
        self._shards_checked.add(None)

    def check_shards(self, parallel: Parallel, dtype: str, capability: int | None) -> None:
        """Refuse a parallel layout whose shards vLLM's kernels reject, with
        the message `plan --tp N` gives (rules in ``tp_constraints``), on the
        composed layer table and geometry."""
        key = (parallel, dtype, capability)
        if key in self._shards_checked:
            return
        self._shards_checked.add(key)
        comp = self._require()
        routed = [
            tp_constraints.Routed(comp.table[name], src, fmt, comp.sources[src].quantization_config)
            for name, (src, fmt) in comp.layers.items()
        ]
        others = {n: (s.format, s.quantization_config) for n, s in comp.sources.items()}
        checks = tp_constraints.check_layers(
            comp.geometry, routed, parallel, dtype=dtype, capability=capability or HOPPER, sources=others
        )
        for c in checks:
            if c.status == tp_constraints.FALLBACK:
                logger.info("vllm-mixed: at %s, %s", parallel, c.fallback_note)
        tp_constraints.raise_on_failures(checks, parallel)

    def _log(self, prefix: str, source: str, fmt: str, method: Any, note: str = "") -> None:
        group = prefix.split(".")[-1] if prefix.startswith("model.layers.") else prefix
        kind = type(method).__name__ if method is not None else "UnquantizedFusedMoEMethod"
        key = (group, source, kind, note)
        if key not in self._logged:
            self._logged.add(key)
            logger.info("vllm-mixed: %s <- source %r (%s) via %s%s", group, source, fmt, kind, note)


def _require_mixed_loader(load_format: str | None) -> None:
    """A composed directory holds no weights: vLLM's default loader would
    fail later with "Cannot find any model weights"; say what to add."""
    if load_format is not None and str(load_format).lower() not in SERVING_LOAD_FORMATS:
        raise MixedError(f"--load-format {load_format}: {LOAD_FORMAT_HINT}")
