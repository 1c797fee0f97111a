"""CPU methods for quantized layers: register exactly the parameters vLLM's
own FP8-block and GPTQ methods register (same names, shapes, loaders and
attributes, so the checkpoint tensors load the same way), then dequantize to
the model dtype after loading and run vLLM's unquantized CPU paths.

vLLM's FP8 and GPTQ CPU kernels need AVX-512/AMX; these keep the whole flow
(routing, three-directory loading) runnable on any CPU. Memory is the BF16
footprint. They subclass the unquantized methods because after loading that
is exactly what they are.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import UnquantizedLinearMethod, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BlockQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)
from vllm.model_executor.utils import set_weight_attrs

from vllm_mixed.formats.fp8_block import FP8_BLOCK, block_size
from vllm_mixed.formats.gptq_int4 import GPTQ_INT4, PER_WORD, dequantize_stacked

__all__ = [
    "CpuDequantFp8BlockLinearMethod",
    "CpuDequantFp8BlockMoEMethod",
    "CpuDequantGptqLinearMethod",
    "CpuDequantGptqMoEMethod",
]

_WORK = torch.float32  # dequantize in fp32, then round once to the model dtype


def _swap_in_weight(layer: torch.nn.Module, drop: tuple[str, ...], **weights: torch.Tensor) -> None:
    for name in drop:
        delattr(layer, name)
    for name, value in weights.items():
        if hasattr(layer, name):
            delattr(layer, name)
        layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


@register_weight_loader_v2_supported_method
class CpuDequantFp8BlockLinearMethod(UnquantizedLinearMethod):
    """Block-FP8 linear: ``weight`` (e4m3) + ``weight_scale_inv`` (fp32)."""

    def __init__(self, quant_config: dict[str, Any]):
        super().__init__()
        self.quant_config = quant_config
        self.block = list(block_size(quant_config))

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype, **extra
    ):
        loader = extra.get("weight_loader")
        out = sum(output_partition_sizes)
        layer.orig_dtype = params_dtype
        layer.logical_widths = output_partition_sizes
        layer.weight_block_size = self.block
        weight = ModelWeightParameter(
            data=torch.empty(out, input_size_per_partition, dtype=torch.float8_e4m3fn),
            input_dim=1, output_dim=0, weight_loader=loader,
        )  # fmt: skip
        bn, bk = self.block
        scale = BlockQuantScaleParameter(
            data=torch.full(((out + bn - 1) // bn, (input_size_per_partition + bk - 1) // bk), torch.nan, dtype=torch.float32),
            input_dim=1, output_dim=0, weight_loader=loader,
        )  # fmt: skip
        layer.register_parameter("weight", weight)
        layer.register_parameter("weight_scale_inv", scale)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        tensors = {"weight": layer.weight.data, "weight_scale_inv": layer.weight_scale_inv.data}
        w = FP8_BLOCK.dequantize(tensors, self.quant_config, dtype=_WORK).to(layer.orig_dtype)
        _swap_in_weight(layer, ("weight_scale_inv",), weight=w)
        super().process_weights_after_loading(layer)


@register_weight_loader_v2_supported_method
class CpuDequantGptqLinearMethod(UnquantizedLinearMethod):
    """GPTQ int4 linear: ``qweight`` / ``qzeros`` / ``scales`` as vLLM's
    AutoGPTQLinearMethod registers them (act-order is refused earlier)."""

    def __init__(self, quant_config: dict[str, Any]):
        super().__init__()
        self.quant_config = quant_config
        self.group = int(quant_config["group_size"])

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype, **extra
    ):
        loader = extra.get("weight_loader")
        k, n = input_size_per_partition, sum(output_partition_sizes)
        group = self.group if self.group != -1 else input_size
        layer.orig_dtype = params_dtype
        qweight = PackedvLLMParameter(
            data=torch.empty(k // PER_WORD, n, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=PER_WORD, weight_loader=loader,
        )  # fmt: skip
        scales = GroupQuantScaleParameter(
            data=torch.empty(k // group, n, dtype=params_dtype), output_dim=1, input_dim=0, weight_loader=loader
        )
        qzeros = PackedvLLMParameter(
            data=torch.empty(k // group, n // PER_WORD, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=1, packed_factor=PER_WORD, weight_loader=loader,
        )  # fmt: skip
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("scales", scales)
        layer.register_parameter("qzeros", qzeros)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        tensors = {"qweight": layer.qweight.data, "qzeros": layer.qzeros.data, "scales": layer.scales.data}
        w = GPTQ_INT4.dequantize(tensors, self.quant_config, dtype=_WORK).to(layer.orig_dtype).contiguous()
        _swap_in_weight(layer, ("qweight", "qzeros", "scales"), weight=w)
        super().process_weights_after_loading(layer)


class CpuDequantFp8BlockMoEMethod(UnquantizedFusedMoEMethod):
    """Block-FP8 experts: ``w13_weight``/``w2_weight`` (e4m3) and
    ``w13_weight_scale_inv``/``w2_weight_scale_inv`` (fp32), BLOCK-loaded."""

    def __init__(self, moe: Any, quant_config: dict[str, Any]):
        super().__init__(moe)
        self.quant_config = quant_config

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        bn, bk = block_size(self.quant_config)
        shards = self.moe.w13_num_shards
        inter = intermediate_size_per_partition
        layer.orig_dtype = params_dtype
        fp8 = torch.float8_e4m3fn
        params = {
            "w13_weight": torch.empty(num_experts, shards * inter, hidden_size, dtype=fp8),
            "w2_weight": torch.empty(num_experts, hidden_size, inter, dtype=fp8),
            "w13_weight_scale_inv": torch.full(
                (num_experts, shards * ((inter + bn - 1) // bn), (hidden_size + bk - 1) // bk), torch.nan
            ),
            "w2_weight_scale_inv": torch.full(
                (num_experts, (hidden_size + bn - 1) // bn, (inter + bk - 1) // bk), torch.nan
            ),
        }
        for name, data in params.items():
            p = torch.nn.Parameter(data, requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, extra)
        for name in ("w13_weight_scale_inv", "w2_weight_scale_inv"):
            set_weight_attrs(getattr(layer, name), {"quant_method": FusedMoeWeightScaleSupported.BLOCK.value})

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        qc = self.quant_config
        w13 = FP8_BLOCK.dequantize(
            {"weight": layer.w13_weight.data, "weight_scale_inv": layer.w13_weight_scale_inv.data}, qc, _WORK
        )
        w2 = FP8_BLOCK.dequantize(
            {"weight": layer.w2_weight.data, "weight_scale_inv": layer.w2_weight_scale_inv.data}, qc, _WORK
        )
        _swap_in_weight(
            layer,
            ("w13_weight_scale_inv", "w2_weight_scale_inv"),
            w13_weight=w13.to(layer.orig_dtype).contiguous(),
            w2_weight=w2.to(layer.orig_dtype).contiguous(),
        )
        super().process_weights_after_loading(layer)


class CpuDequantGptqMoEMethod(UnquantizedFusedMoEMethod):
    """GPTQ int4 experts, as vLLM's AutoGPTQMoEMethod registers them
    (transposed, GROUP-loaded)."""

    _QUANT = ("w13_qweight", "w2_qweight", "w13_scales", "w2_scales", "w13_qzeros", "w2_qzeros")

    def __init__(self, moe: Any, quant_config: dict[str, Any]):
        super().__init__(moe)
        self.quant_config = quant_config
        self.group = int(quant_config["group_size"])

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        inter2 = self.moe.w13_num_shards * intermediate_size_per_partition
        inter = intermediate_size_per_partition
        g13 = hidden_size // self.group if self.group != -1 else 1
        g2 = inter // self.group if self.group != -1 else 1
        layer.orig_dtype = params_dtype
        strategy = (
            FusedMoeWeightScaleSupported.GROUP if self.group != -1 else FusedMoeWeightScaleSupported.CHANNEL
        ).value
        attrs = {**extra, "quant_method": strategy, "is_transposed": True}
        i32 = torch.int32
        params = {
            "w13_qweight": torch.empty(num_experts, hidden_size // PER_WORD, inter2, dtype=i32),
            "w2_qweight": torch.empty(num_experts, inter // PER_WORD, hidden_size, dtype=i32),
            "w13_scales": torch.empty(num_experts, g13, inter2, dtype=params_dtype),
            "w2_scales": torch.empty(num_experts, g2, hidden_size, dtype=params_dtype),
            "w13_qzeros": torch.empty(num_experts, g13, inter2 // PER_WORD, dtype=i32),
            "w2_qzeros": torch.empty(num_experts, g2, hidden_size // PER_WORD, dtype=i32),
        }
        for name, data in params.items():
            p = torch.nn.Parameter(data, requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, attrs)

    def _dequant(self, layer: torch.nn.Module, prefix: str) -> torch.Tensor:
        q, z, s = (getattr(layer, f"{prefix}_{n}").data for n in ("qweight", "qzeros", "scales"))
        return dequantize_stacked(q, z, s, self.group, _WORK, layer.orig_dtype)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w13, w2 = self._dequant(layer, "w13"), self._dequant(layer, "w2")
        _swap_in_weight(layer, self._QUANT, w13_weight=w13, w2_weight=w2)
        super().process_weights_after_loading(layer)
