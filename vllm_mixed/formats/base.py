"""What every on-disk format provides, as one small base class.

A format object knows everything about one published layout of a linear
layer's weight: whether a checkpoint's ``quantization_config`` is it, the
tensors it stores and the dtypes vLLM holds them in, how to write and decode
them (float64 reference), which kernels vLLM runs it on and the
tensor-parallel rules those kernels impose, the vLLM config that hands out
those methods, the parameters the CPU fallback registers, its
compressed-tensors export and its tiny-checkpoint layout. Nothing here
imports vLLM or compressed-tensors at module level: the methods that need
them import them when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from vllm_mixed.models.base import Geometry, Layer
    from vllm_mixed.parallel import LinearShard, Parallel

__all__ = ["ExpertParam", "ExportScheme", "Format", "LinearParam", "TensorSpec", "TinyLayout"]

QuantConfig = dict[str, Any] | None


@dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor of a linear must be: allowed safetensors
    dtypes (the first is what the writer uses) and its exact shape.
    ``optional`` tensors may be absent from a checkpoint."""

    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class LinearParam:
    """One parameter vLLM's linear method for a format registers on one rank
    (the CPU fallback registers the same): its shape, dtype (``None``: the
    model's), vLLM parameter class (``weight``, ``packed``, ``group_scale``,
    ``block_scale``, ``channel_scale``, ``packed_column``, ``row``) and the
    dims its weight loader shards along (``None``: the class takes no such dim)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    kind: str
    input_dim: int | None
    output_dim: int | None
    packed_dim: int | None = None
    packed_factor: int | None = None
    fill: float | None = None  # initial value; None: uninitialised


@dataclass(frozen=True)
class ExpertParam:
    """One stacked expert parameter (``w13_<suffix>`` / ``w2_<suffix>``) as
    vLLM's MoE method for a format registers it, with the weight-loader
    attributes (``quant_method``: block/group/channel, ``is_transposed``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    attrs: dict[str, Any] = field(default_factory=dict)
    fill: float | None = None


@dataclass(frozen=True)
class TinyLayout:
    """How ``make-tiny`` writes a checkpoint of this format: directory name,
    the published ``quantization_config``, the dtype of its float tensors and
    the source name its recipe gives it."""

    directory: str
    quant_config: QuantConfig
    float_dtype: str
    source: str


@dataclass(frozen=True)
class ExportScheme:
    """A compressed-tensors config group without targets: layers of one
    format whose quantization parameters agree share one."""

    format: str
    weights: Any  # compressed_tensors QuantizationArgs
    input_activations: Any = None

    @property
    def key(self) -> str:
        inputs = self.input_activations.model_dump_json() if self.input_activations else ""
        return f"{self.format}|{self.weights.model_dump_json()}|{inputs}"


class Format:
    """One published on-disk format. Subclasses override what differs; the
    defaults describe a quantized format with no special rules."""

    name: str = ""
    quantized: bool = True
    #: shown in the "not supported" message, e.g. "gptq (4-bit)"
    description: str = ""
    tiny: TinyLayout | None = None
    #: the fastest vLLM MoE backend measured for this format's experts, per CUDA
    #: compute capability (``kernel_choice`` asks vLLM for it; absent: vLLM's choice)
    moe_kernels: ClassVar[dict[int, str]] = {}

    def with_tiny(self, directory: str, quant_config: QuantConfig, source: str) -> Format:
        """This format with the tiny layout of another published config (the
        same float dtype): for ``make-tiny --formats``, tests and the oracles."""
        fmt = type(self)()
        fmt.tiny = TinyLayout(directory, quant_config, self.tiny.float_dtype, source)
        return fmt

    # --- detection ---------------------------------------------------------------------------------------------
    def claims(self, quant_config: dict[str, Any]) -> bool:
        """Whether a checkpoint's (non-empty) ``quantization_config`` is this format's."""
        return False

    def validate(self, quant_config: dict[str, Any], where: str) -> None:
        """Raise a MixedError naming ``where`` if a claimed config is a variant
        this format cannot read."""

    # --- tensors -----------------------------------------------------------------------------------------------
    def precision(self, quant_config: QuantConfig, dtype: str = "bfloat16") -> str:
        """Short label for tables, e.g. ``int4-g128``."""
        raise NotImplementedError

    def specs(self, out_features: int, in_features: int, quant_config: QuantConfig) -> dict[str, TensorSpec]:
        """Checkpoint tensor suffix -> spec, for a ``[out, in]`` linear."""
        raise NotImplementedError

    def missing_hint(self, suffix: str, quant_config: QuantConfig) -> str:
        """Why a checkpoint needs tensor ``suffix`` and how to fix its absence
        (appended to the plan's error; ``""``: nothing to add)."""
        return ""

    def shape_hint(self, suffix: str, shape: tuple[int, ...], spec: TensorSpec, quant_config: QuantConfig) -> str:
        """What a tensor of a wrong ``shape`` most likely is (e.g. another
        format's layout), appended to the plan's error; ``""``: nothing."""
        return ""

    def runtime_dtype(self, suffix: str, model_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype vLLM's parameter for a checkpoint tensor holds (the loader
        casts to it); ``None``: as stored."""
        return None

    def quantize(self, weight: torch.Tensor, quant_config: QuantConfig, **options: Any) -> dict[str, torch.Tensor]:
        """Writer side: the checkpoint tensors that encode ``weight``."""
        raise NotImplementedError

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: QuantConfig, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Reference decoder: the ``[out, in]`` weight the tensors encode."""
        raise NotImplementedError

    def dequantize_linear(
        self, tensors: dict[str, torch.Tensor], quant_config: QuantConfig, parts: list[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """One rank's loaded linear parameters (:meth:`linear_params`, output
        ``parts`` per fused member) to its ``[out, in]`` weight."""
        return self.dequantize(tensors, quant_config, dtype)

    def dequantize_experts(
        self, tensors: dict[str, torch.Tensor], quant_config: QuantConfig, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Stacked expert parameters by suffix, as :meth:`expert_params`
        describes them, to ``[E, out, in]`` in ``out_dtype``."""
        return self.dequantize(tensors, quant_config, torch.float32).to(out_dtype)

    def unconverted_modules(self, layers: list[Layer]) -> list[str]:
        """Modules the published checkpoint config lists as left in float."""
        return []

    def converts(self, quant_config: QuantConfig, layer: Layer, where: str) -> bool:
        """Whether a checkpoint of this format holds a quantizable ``layer``
        quantized (else in float): not if its config lists the layer or one
        of its first members in ``modules_to_not_convert`` / ``ignored_layers``."""
        qc = quant_config or {}
        skipped = list(qc.get("modules_to_not_convert") or []) + list(qc.get("ignored_layers") or [])
        names = [layer.name, *(m.name for m in layer.members[:3])]
        return not any(n == s or n.endswith("." + s) for n in names for s in skipped)

    # --- vLLM --------------------------------------------------------------------------------------------------
    def measured_moe_backend(self, capability: int, quant_config: QuantConfig) -> str | None:
        """The vLLM MoE backend measured fastest for these experts on this
        CUDA capability (``moe_kernels``); ``None``: leave it to vLLM."""
        return self.moe_kernels.get(capability)

    def vllm_methods(self) -> tuple[str, str]:
        """(linear, MoE) class names of the methods vLLM hands out for this
        format (what ``plan`` predicts; the engine logs what it built)."""
        return "UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"

    def vllm_config(self, quant_config: dict[str, Any], quantized_modules: list[str]) -> Any:
        """vLLM's own ``QuantizationConfig`` for one source of this format."""
        raise NotImplementedError(f"format {self.name!r} has no vLLM config")

    def cpu_kernel(self, kind: str, quant_config: dict[str, Any]) -> str | None:
        """Why vLLM's CPU build has no kernel for this format's ``kind``
        ("linear" or "experts") layers on this CPU, or ``None`` when it has
        one: asked of vLLM's own kernel classes (imported when called). The
        plugin then runs vLLM's method, else the dequantizing fallback."""
        return None if not self.quantized else f"vLLM has no CPU kernel for {self.name}"

    def int4_group_length(self, quant_config: QuantConfig, k: int) -> int | None:
        """Input columns per scale group where this format's weights are
        4-bit integers grouped along the input (a layer with ``k`` inputs),
        the layout vLLM's CPU int4 kernels repack; ``None`` for any other."""
        return None

    def linear_params(
        self, k: int, parts: list[int], input_size: int, quant_config: QuantConfig
    ) -> dict[str, LinearParam]:
        """The parameters of one rank's linear (``k`` inputs, output ``parts``)."""
        raise NotImplementedError

    def linear_layer_attrs(self, quant_config: QuantConfig) -> dict[str, Any]:
        """Attributes vLLM's linear method sets on the layer that vLLM's
        weight loaders read (e.g. FP8's ``weight_block_size``)."""
        return {}

    def expert_params(
        self, experts: int, hidden: int, inter: int, w13_shards: int, quant_config: QuantConfig
    ) -> dict[str, dict[str, ExpertParam]]:
        """``{"w13": {suffix: param}, "w2": {...}}`` of one rank's experts."""
        raise NotImplementedError

    # --- tensor-parallel rules (restated from vLLM's kernel checks) --------------------------------------------
    def linear_rule(
        self, shard: LinearShard, quant_config: dict[str, Any], dtype: str, capability: int
    ) -> tuple[str, str, str] | None:
        """(kernel, status, reason) of a linear shard; ``None``: no rule (ok)."""
        return None

    def moe_rule(
        self, inter: int, geometry: Geometry, parallel: Parallel, quant_config: dict[str, Any]
    ) -> tuple[str, str, str] | None:
        """(kernel, status, reason) of the experts at ``inter`` per rank."""
        return None

    # --- export to compressed-tensors --------------------------------------------------------------------------
    def export_scheme(self, quant_config: dict[str, Any], where: str) -> ExportScheme:
        """The compressed-tensors group this format's layers export as."""
        raise NotImplementedError(f"format {self.name!r} cannot be exported")

    def export_member(
        self, name: str, tensors: dict[str, torch.Tensor], quant_config: QuantConfig, scheme: Any, where: str
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """One member's compressed tensors, and whether the source codes came
        through bit for bit."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<format {self.name}>"
