"""Block-scaled FP8, as in Qwen/Qwen3-*-FP8 and DeepSeek-V3.

Each quantized linear stores ``weight`` (float8_e4m3fn, [out, in]) and
``weight_scale_inv`` ([ceil(out/bn), ceil(in/bk)], fp32 or bf16). Despite its
name the scale multiplies: real weight = weight * scale, broadcast over each
bn x bk block. vLLM runs it with ``Fp8Config`` (block FP8 GEMM for linears,
``Fp8MoEMethod`` for experts), activations quantized per token and group of bk.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from vllm_mixed.errors import MixedError
from vllm_mixed.formats.base import ExpertParam, ExportScheme, Format, LinearParam, TensorSpec, TinyLayout
from vllm_mixed.parallel import FAILS, OK

if TYPE_CHECKING:
    from vllm_mixed.models.base import Geometry, Layer
    from vllm_mixed.parallel import LinearShard, Parallel

__all__ = ["FP8_BLOCK", "FP8_QUANT_CONFIG", "block_size", "expand_block_scale"]

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448

# As published for Qwen/Qwen3-30B-A3B-FP8 (the checkpoint adds modules_to_not_convert).
FP8_QUANT_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


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


class Fp8Block(Format):
    name = "fp8_block"
    description = "fp8 with weight_block_size"
    tiny = TinyLayout("fp8", FP8_QUANT_CONFIG, "bfloat16", "fp8")

    def claims(self, quant_config: dict[str, Any]) -> bool:
        return str(quant_config.get("quant_method", "")).lower() == "fp8"

    def validate(self, quant_config: dict[str, Any], where: str) -> None:
        block = quant_config.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise MixedError(
                f"{where}: fp8 checkpoint without weight_block_size [n, k]; vllm-mixed reads block-scaled FP8 "
                "(such as Qwen/Qwen3-30B-A3B-FP8); per-tensor FP8 is not supported"
            )
        if quant_config.get("activation_scheme", "dynamic") != "dynamic":
            raise MixedError(
                f"{where}: block FP8 needs activation_scheme 'dynamic', got {quant_config['activation_scheme']!r}"
            )

    def precision(self, quant_config: dict[str, Any] | None, dtype: str = "bfloat16") -> str:
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

    def runtime_dtype(self, suffix: str, model_dtype: torch.dtype) -> torch.dtype | None:
        return torch.float32 if suffix == "weight_scale_inv" else None  # vLLM allocates the scales in fp32

    def quantize(
        self, weight: torch.Tensor, quant_config: dict[str, Any] | None, scale_dtype: torch.dtype = torch.bfloat16,
        **_: Any,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Per-block amax scaling; the scale is rounded to ``scale_dtype`` first
        so that weight * stored scale is the exact dequantization."""
        out_features, in_features = weight.shape
        bn, bk = block_size(quant_config)
        w = weight.to(torch.float32)
        rows, cols = math.ceil(out_features / bn), math.ceil(in_features / bk)
        padded = torch.zeros(rows * bn, cols * bk, dtype=torch.float32, device=w.device)
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

    def unconverted_modules(self, layers: list[Layer]) -> list[str]:
        """Qwen's FP8 checkpoints list the head and every router."""
        return [p.name for p in layers if p.kind in ("lm_head", "router")]

    # --- vLLM ----------------------------------------------------------------------------------------------------
    def vllm_methods(self) -> tuple[str, str]:
        return "Fp8LinearMethod", "Fp8MoEMethod"

    def vllm_config(self, quant_config: dict[str, Any], quantized_modules: list[str]) -> Any:
        from vllm.model_executor.layers.quantization.fp8 import Fp8Config

        return Fp8Config.from_config(dict(quant_config))

    def cpu_kernel(self, kind: str, quant_config: dict[str, Any]) -> str | None:
        """vLLM's CPU block-FP8 GEMMs (``_POSSIBLE_FP8_BLOCK_KERNELS``) and FP8
        MoE experts (its oracle's CPU backends), each by its own device check."""
        from vllm.platforms import current_platform

        if kind == "experts":
            from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle

            classes = [c for b in (oracle.Fp8MoeBackend.CPU_W8A8, oracle.Fp8MoeBackend.CPU)
                       for c in oracle.backend_to_kernel_cls(b)]  # fmt: skip
            if any(c._supports_current_device() for c in classes):
                return None
            return f"no FP8 MoE experts for this CPU: {', '.join(c.__name__ for c in classes)} do not support it"
        from vllm.model_executor.kernels.linear import _POSSIBLE_FP8_BLOCK_KERNELS

        reasons = []
        for kernel in _POSSIBLE_FP8_BLOCK_KERNELS.get(current_platform._enum, []):
            ok, why = kernel.is_supported()
            if ok:
                return None
            reasons.append(f"{kernel.__name__} {why}")
        return "no block-FP8 GEMM for this CPU: " + "; ".join(reasons or ["none listed"])

    def linear_params(
        self, k: int, parts: list[int], input_size: int, quant_config: dict[str, Any] | None
    ) -> dict[str, LinearParam]:
        bn, bk = block_size(quant_config)
        n = sum(parts)
        return {
            "weight": LinearParam((n, k), torch.float8_e4m3fn, "weight", input_dim=1, output_dim=0),
            "weight_scale_inv": LinearParam(
                (-(-n // bn), -(-k // bk)), torch.float32, "block_scale", input_dim=1, output_dim=0, fill=math.nan
            ),
        }

    def linear_layer_attrs(self, quant_config: dict[str, Any] | None) -> dict[str, Any]:
        return {"weight_block_size": list(block_size(quant_config))}  # read by the block-scale shard loader

    def expert_params(
        self, experts: int, hidden: int, inter: int, w13_shards: int, quant_config: dict[str, Any] | None
    ) -> dict[str, dict[str, ExpertParam]]:
        bn, bk = block_size(quant_config)
        fp8, block = torch.float8_e4m3fn, {"quant_method": "block"}
        return {
            "w13": {
                "weight": ExpertParam((experts, w13_shards * inter, hidden), fp8),
                "weight_scale_inv": ExpertParam(
                    (experts, w13_shards * -(-inter // bn), -(-hidden // bk)), torch.float32, block, math.nan
                ),
            },
            "w2": {
                "weight": ExpertParam((experts, hidden, inter), fp8),
                "weight_scale_inv": ExpertParam(
                    (experts, -(-hidden // bn), -(-inter // bk)), torch.float32, block, math.nan
                ),
            },
        }

    # --- tensor-parallel rules -----------------------------------------------------------------------------------
    def linear_rule(
        self, shard: LinearShard, quant_config: dict[str, Any], dtype: str, capability: int
    ) -> tuple[str, str, str]:
        """quantization/utils/fp8_utils.py:validate_fp8_block_shape, called by
        Fp8LinearMethod.create_weights: a row-parallel shard's input and every
        column-parallel (or fused) output part must be whole FP8 blocks. The
        plugin's config has no weight_block_size, so linear.py's
        _maybe_allow_fp8_block_shape_mismatch never relaxes it."""
        bn, bk = block_size(quant_config)
        kernel = "Fp8LinearMethod (block FP8 GEMM)"
        rule = "fp8_utils.validate_fp8_block_shape"
        if shard.row_split and shard.k % bk:
            return kernel, FAILS, f"input_size_per_partition {shard.k} is not a multiple of FP8 block_k {bk} ({rule})"
        for part in shard.parts if shard.col_split else shard.parts[:-1]:
            if part % bn:
                return kernel, FAILS, f"output partition {part} is not a multiple of FP8 block_n {bn} ({rule})"
        return kernel, OK, ""

    def moe_rule(
        self, inter: int, geometry: Geometry, parallel: Parallel, quant_config: dict[str, Any]
    ) -> tuple[str, str, str]:
        """quantization/fp8.py:Fp8MoEMethod.create_weights: the per-rank
        intermediate size must be whole blocks of block_n, and of block_k once the
        global tensor-parallel size is above 1."""
        bn, bk = block_size(quant_config)
        for block, name, applies in ((bn, "block_n", True), (bk, "block_k", parallel.tp > 1)):
            if applies and inter % block:
                why = f"intermediate_size_per_partition {inter} is not a multiple of FP8 {name} {block}"
                return "Fp8MoEMethod", FAILS, f"{why} (Fp8MoEMethod.create_weights)"
        return "Fp8MoEMethod", OK, ""

    # --- export --------------------------------------------------------------------------------------------------
    def export_scheme(self, quant_config: dict[str, Any], where: str) -> ExportScheme:
        """``float-quantized`` block weights; dynamic fp8 ``group`` input
        activations of bk, as vLLM's block FP8 GEMM quantizes them."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

        bn, bk = block_size(quant_config)
        weights = QuantizationArgs(
            num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.BLOCK,
            block_structure=[bn, bk], symmetric=True, dynamic=False,
        )  # fmt: skip
        inputs = QuantizationArgs(
            num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.GROUP,
            group_size=bk, symmetric=True, dynamic=True,
        )  # fmt: skip
        return ExportScheme(self.name, weights, inputs)

    def export_member(
        self, name: str, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, scheme: Any, where: str
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """``weight`` keeps its fp8 bits; ``weight_scale_inv`` becomes ``weight_scale``."""
        from compressed_tensors.compressors import BaseCompressor

        state = {
            "weight": self.dequantize(tensors, quant_config, torch.float64),
            "weight_scale": tensors["weight_scale_inv"],
        }
        out = BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme)
        return out, torch.equal(out["weight"].view(torch.uint8), tensors["weight"].view(torch.uint8))


FP8_BLOCK = Fp8Block()
