"""The fallback for a quantized layer vLLM has no kernel for on this
platform: register exactly the parameters vLLM's own method for the format
registers (same names, shapes, loaders and attributes, described by the
format object), so the checkpoint tensors load the same way; then dequantize
them to the model dtype after loading with the format's reference decoder
and run vLLM's unquantized paths. Memory is then the float footprint.

One class for linears and one for experts serve every format: what differs
is data (``Format.linear_params`` / ``expert_params``). They subclass the
unquantized methods because after loading that is exactly what they are.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import UnquantizedLinearMethod, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    BlockQuantScaleParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
    RowvLLMParameter,
)
from vllm.model_executor.utils import set_weight_attrs

from vllm_mixed.errors import MixedError
from vllm_mixed.formats.base import Format

__all__ = ["DequantFallbackLinearMethod", "DequantFallbackMoEMethod"]

_WORK = torch.float32  # dequantize in fp32, then round once to the model dtype
_PARAMETER_CLASSES = {
    "weight": ModelWeightParameter,
    "packed": PackedvLLMParameter,
    "group_scale": GroupQuantScaleParameter,
    "block_scale": BlockQuantScaleParameter,
    "channel_scale": ChannelQuantScaleParameter,
    "tensor_scale": PerTensorScaleParameter,
    "packed_column": PackedColumnParameter,
    "base": BasevLLMParameter,
    "row": RowvLLMParameter,
}
# the dims each parameter class takes (BasevLLMParameter and PerTensorScaleParameter take none)
_DIMS = {
    "weight": ("input_dim", "output_dim"), "packed": ("input_dim", "output_dim"), "group_scale": ("input_dim", "output_dim"),
    "block_scale": ("input_dim", "output_dim"), "channel_scale": ("output_dim",), "packed_column": ("output_dim",),
    "tensor_scale": (), "base": (), "row": ("input_dim",),
}  # fmt: skip


def _empty(shape: tuple[int, ...], dtype: torch.dtype, fill: float | None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype) if fill is None else torch.full(shape, fill, dtype=dtype)


def _swap_in(layer: torch.nn.Module, drop: list[str], **weights: torch.Tensor) -> None:
    for name in drop:
        delattr(layer, name)
    for name, value in weights.items():
        if hasattr(layer, name):
            delattr(layer, name)
        layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


@register_weight_loader_v2_supported_method
class DequantFallbackLinearMethod(UnquantizedLinearMethod):
    """A quantized linear, loaded as its format stores it, run unquantized."""

    def __init__(self, fmt: Format, quant_config: dict[str, Any]):
        super().__init__()
        self.fmt, self.quant_config = fmt, quant_config

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype, **extra
    ):
        loader = extra.get("weight_loader")
        layer.orig_dtype = params_dtype
        layer.logical_widths = output_partition_sizes
        for name, value in self.fmt.linear_layer_attrs(self.quant_config).items():
            setattr(layer, name, value)
        params = self.fmt.linear_params(
            input_size_per_partition, list(output_partition_sizes), input_size, self.quant_config
        )
        for name, p in params.items():
            dims = {d: getattr(p, d) for d in _DIMS[p.kind] if getattr(p, d) is not None}
            if p.packed_dim is not None:
                dims.update(packed_dim=p.packed_dim, packed_factor=p.packed_factor)
            data = _empty(p.shape, p.dtype or params_dtype, p.fill)
            layer.register_parameter(name, _PARAMETER_CLASSES[p.kind](data=data, weight_loader=loader, **dims))
        layer.fallback_params = list(params)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        tensors = {name: getattr(layer, name).data for name in layer.fallback_params}
        w = self.fmt.dequantize_linear(tensors, self.quant_config, list(layer.logical_widths), _WORK)
        w = w.to(layer.orig_dtype).contiguous()
        _swap_in(layer, layer.fallback_params, weight=w)
        super().process_weights_after_loading(layer)


class DequantFallbackMoEMethod(UnquantizedFusedMoEMethod):
    """Quantized experts, loaded as their format stores them, run unquantized."""

    def __init__(self, moe: Any, fmt: Format, quant_config: dict[str, Any]):
        super().__init__(moe)
        self.fmt, self.quant_config = fmt, quant_config

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        layer.orig_dtype = params_dtype
        specs = self.fmt.expert_params(
            num_experts, hidden_size, intermediate_size_per_partition, self.moe.w13_num_shards, self.quant_config
        )
        for prefix, params in specs.items():
            for suffix, p in params.items():
                param = torch.nn.Parameter(_empty(p.shape, p.dtype or params_dtype, p.fill), requires_grad=False)
                layer.register_parameter(f"{prefix}_{suffix}", param)
                attrs = {**extra, **p.attrs}
                if attrs.pop("own_loader", None) == "g_idx":
                    attrs["weight_loader"] = self._g_idx_loader(f"{prefix}_{suffix}")
                set_weight_attrs(param, attrs)
        layer.fallback_params = {prefix: list(params) for prefix, params in specs.items()}

    def _g_idx_loader(self, name: str) -> Any:
        """The loader of an act-order ``g_idx`` per expert (vLLM >= 0.27's
        expert loader has no case for it): gate and up share the row and must
        agree; at TP 1 without expert parallelism only (with act-order each
        rank's down projection needs every group's scales, which vLLM's loader
        splits)."""
        if self.moe.tp_size > 1 or self.moe.use_ep:
            raise MixedError(
                f"act-order GPTQ experts ({name}) run on the CPU fallback at tensor_parallel_size 1 without expert "
                "parallelism only: route them to a desc_act: false, AWQ or bf16 source, or serve at TP 1"
            )

        def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            row = param.data[expert_id]
            loaded_weight = loaded_weight.to(row.dtype)
            if shard_id != "w2" and int(row.min()) >= 0 and not torch.equal(row, loaded_weight):
                raise MixedError(
                    f"{weight_name}: the gate and up projections of expert {expert_id} have different g_idx; vLLM's "
                    "MoE kernels keep one column order per expert (GPTQ gives projections of one input the same)"
                )
            row.copy_(loaded_weight)
            return True if return_success else None

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weights, drop = {}, []
        for prefix, suffixes in layer.fallback_params.items():
            tensors = {s: getattr(layer, f"{prefix}_{s}").data for s in suffixes}
            weights[f"{prefix}_weight"] = self.fmt.dequantize_experts(
                tensors, self.quant_config, layer.orig_dtype
            ).contiguous()
            drop += [f"{prefix}_{s}" for s in suffixes]
        _swap_in(layer, drop, **weights)
        super().process_weights_after_loading(layer)
