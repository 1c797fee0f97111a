"""AWQ 4-bit in AutoAWQ's GEMM layout (``quant_method: awq``, ``version:
gemm``, ``zero_point: true``), read by vLLM's ``AutoAWQConfig``: AWQ-Marlin
linears and Marlin MoE on CUDA, CPUWNA16LinearKernel linears on the CPU build.

Per quantized linear with K inputs, N outputs and group size g:
``qweight`` int32 [K, N/8] and ``qzeros`` int32 [K/g, N/8], both packed
along N eight to a word in AutoAWQ's interleaved order: nibble i (bits
4i..4i+3) of word c holds column ``8c + AWQ_ORDER[i]``, AWQ_ORDER = [0, 2, 4,
6, 1, 3, 5, 7] (AutoAWQ's ``order_map``; vLLM undoes it with
``_REVERSE_AWQ_PACK_ORDER`` = [0, 4, 1, 5, 2, 6, 3, 7]); ``scales`` fp16
[K/g, N]. Zero points are stored as they are (0..15, no minus one):
real weight[n, k] = (q[k, n] - zero[k // g, n]) * scale[k // g, n].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_mixed.errors import MixedError
from vllm_mixed.formats.base import ExpertParam, ExportScheme, Format, LinearParam, TensorSpec, TinyLayout
from vllm_mixed.formats.gptq_int4 import GPTQ_INT4
from vllm_mixed.formats.gptq_pack import fp16_scale, pack_bits, unpack_bits
from vllm_mixed.formats.gptq_rules import MARLIN_GROUPS
from vllm_mixed.parallel import FAILS, FALLBACK, OK

if TYPE_CHECKING:
    from vllm_mixed.models.base import Geometry
    from vllm_mixed.parallel import LinearShard, Parallel

__all__ = ["AWQ", "AWQ_ORDER", "AWQ_QUANT_CONFIG", "awq_pack", "awq_unpack"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_METHODS = ("awq", "awq_marlin", "auto_awq")
MAXQ = 15

# As published for Qwen/Qwen3-32B-AWQ (AutoAWQ GEMM).
AWQ_QUANT_CONFIG: dict[str, Any] = {
    "bits": 4,
    "group_size": 128,
    "modules_to_not_convert": None,
    "quant_method": "awq",
    "version": "gemm",
    "zero_point": True,
}


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[..., N] values 0..15 -> [..., N/8] int32 words in AWQ's interleaved order."""
    n = values.shape[-1]
    v = values.reshape(*values.shape[:-1], n // 8, 8)[..., list(AWQ_ORDER)]
    return pack_bits(v.reshape(*values.shape[:-1], n), -1, 4)


def awq_unpack(words: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`awq_pack`: [..., N/8] words -> [..., N] values."""
    nibbles = unpack_bits(words, -1, 4, dtype)  # nibble i of word c at 8c + i
    out = torch.empty_like(nibbles)
    view = out.view(*out.shape[:-1], -1, 8)
    view[..., list(AWQ_ORDER)] = nibbles.view(*nibbles.shape[:-1], -1, 8)
    return out


def group_size(quant_config: dict[str, Any] | None) -> int:
    qc = quant_config or {}
    return int(qc.get("group_size", qc.get("q_group_size", 128)))


class Awq(Format):
    name = "awq"
    description = "awq (4-bit gemm, zero points)"
    tiny = TinyLayout("awq", AWQ_QUANT_CONFIG, "float16", "awq")

    def claims(self, quant_config: dict[str, Any]) -> bool:
        return str(quant_config.get("quant_method", "")).lower() in AWQ_METHODS

    def validate(self, quant_config: dict[str, Any], where: str) -> None:
        qc, problems = quant_config, []
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            problems.append(f"bits={bits!r} (vLLM's AWQ kernels read 4-bit only)")
        if str(qc.get("version", "gemm")).lower() != "gemm":
            problems.append(f"version={qc.get('version')!r} (only AutoAWQ's 'gemm' packing; gemv and marlin differ)")
        if qc.get("zero_point") is not True:
            problems.append(f"zero_point={qc.get('zero_point')!r} (AWQ GEMM checkpoints carry zero points: true)")
        g = qc.get("group_size", qc.get("q_group_size"))
        if g not in MARLIN_GROUPS:
            problems.append(
                f"group_size={g!r} (vLLM's AWQ kernels take {', '.join(map(str, MARLIN_GROUPS))}: AWQ-Marlin, the "
                "Triton AWQ GEMM and Marlin MoE; re-quantize with one of them)"
            )
        if problems:
            raise MixedError(f"{where}: unsupported AWQ checkpoint: " + "; ".join(problems))

    def precision(self, quant_config: dict[str, Any] | None, dtype: str = "bfloat16") -> str:
        return f"awq-int4-g{group_size(quant_config)}"

    def _groups(self, k: int, quant_config: dict[str, Any] | None) -> int:
        g = group_size(quant_config)
        return 1 if g == -1 else k // g

    def specs(self, out_features: int, in_features: int, quant_config: dict[str, Any] | None) -> dict[str, TensorSpec]:
        k, n, groups = in_features, out_features, self._groups(in_features, quant_config)
        return {
            "qweight": TensorSpec(("I32",), (k, n // 8)),
            "qzeros": TensorSpec(("I32",), (groups, n // 8)),
            "scales": TensorSpec(("F16", "BF16"), (groups, n)),
        }

    def missing_hint(self, suffix: str, quant_config: dict[str, Any] | None) -> str:
        if suffix == "qzeros":
            return "AWQ GEMM (zero_point: true) stores each group's zero points there; without them it cannot decode"
        return ""

    def shape_hint(self, suffix: str, shape: tuple[int, ...], spec: TensorSpec, quant_config: Any) -> str:
        """AWQ packs along the output dim, GPTQ along the input dim: a
        qweight of [K/8, N] is a GPTQ tensor under an AWQ config."""
        if suffix == "qweight" and len(shape) == 2 and shape == (spec.shape[0] // 8, spec.shape[1] * 8):
            return (
                "that is GPTQ's layout [in/8, out] (packed along the input dim), not AWQ's [in, out/8]: the checkpoint "
                "is GPTQ (fix quantization_config.quant_method) or was repacked wrongly; re-export it with AutoAWQ"
            )
        if suffix in ("qzeros", "scales") and len(shape) == 2 and shape[::-1] == spec.shape:
            return f"that is {suffix} transposed ([out, groups]); AWQ stores [groups, out]: re-export it with AutoAWQ"
        return ""

    def runtime_dtype(self, suffix: str, model_dtype: torch.dtype) -> torch.dtype | None:
        return model_dtype if suffix == "scales" else None  # vLLM allocates scales in the model dtype

    def quantize(self, weight: torch.Tensor, quant_config: dict[str, Any] | None, **_: Any) -> dict[str, torch.Tensor]:
        """AutoAWQ's zero-point rounding (``pseudo_quantize_tensor``): scale
        (max - min) / 15, zero -round(min / scale) in 0..15; no activation
        search (the tiny model has no calibration data). The scale is rounded
        to fp16 upwards first, so the stored tensors decode exactly to what the
        reference computes and no code clips."""
        n, k = weight.shape
        g = k if group_size(quant_config) == -1 else group_size(quant_config)
        if k % g or n % 8:
            raise ValueError(f"AWQ needs in_features % {g} == 0 and out_features % 8 == 0, got [{n}, {k}]")
        w = weight.to(torch.float64).t().reshape(k // g, g, n)  # [groups, g, N]
        lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = fp16_scale((hi - lo) / MAXQ)
        s64 = scale.to(torch.float64)
        zero = torch.round(-lo / s64).clamp(0, MAXQ)
        q = (torch.round(w / s64.unsqueeze(1)) + zero.unsqueeze(1)).clamp(0, MAXQ).to(torch.int64).reshape(k, n)
        return {"qweight": awq_pack(q), "qzeros": awq_pack(zero.to(torch.int64)), "scales": scale.contiguous()}

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        q = awq_unpack(tensors["qweight"])  # [..., K, N]
        k = q.shape[-2]
        zeros, scales = awq_unpack(tensors["qzeros"]), tensors["scales"].to(dtype)  # [..., G, N]
        rows = torch.arange(k, device=q.device) // (k // zeros.shape[-2])
        w = (q - zeros[..., rows, :]).to(dtype) * scales[..., rows, :]
        return w.transpose(-1, -2)

    def dequantize_experts(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """[E, K, N/8] stacks (AutoAWQMoEMethod's layout) to [E, N, K], a few experts at a time."""
        e = tensors["qweight"].shape[0]
        out = None
        for lo in range(0, e, 16):
            part = {s: t[lo : lo + 16] for s, t in tensors.items()}
            w = self.dequantize(part, quant_config, torch.float32).to(out_dtype)
            if out is None:
                out = torch.empty(e, *w.shape[1:], dtype=out_dtype)
            out[lo : lo + 16] = w
        return out

    # --- vLLM ----------------------------------------------------------------------------------------------------
    def vllm_methods(self) -> tuple[str, str]:
        return "AutoAWQMarlinLinearMethod", "AutoAWQMoEMethod"

    def vllm_config(self, quant_config: dict[str, Any], quantized_modules: list[str]) -> Any:
        """vLLM's own config; the plugin routes only the layers this source
        quantizes to it (maybe_update_config, which would list the float ones
        in modules_to_not_convert, is never called for a sub-config)."""
        from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig

        return AutoAWQConfig.from_config({**quant_config, "quant_method": "awq"})

    def int4_group_length(self, quant_config: dict[str, Any], k: int) -> int | None:
        g = group_size(quant_config)
        return k if g == -1 else g

    def cpu_kernel(self, kind: str, quant_config: dict[str, Any]) -> str | None:
        """What AutoAWQConfig runs on the CPU build: AutoAWQMarlinLinearMethod
        (choose_mp_linear_kernel for uint4 with zero points: CPUWNA16LinearKernel,
        whose op is missing from the AVX2 build) and AutoAWQMoEMethod (the WNA16
        oracle's CPU backends; ZEN_CPU refuses zero points)."""
        if kind == "experts":  # the same oracle as GPTQ int4's experts
            return GPTQ_INT4.cpu_kernel(kind, {"desc_act": False})
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
        from vllm.scalar_type import scalar_types

        config = MPLinearLayerConfig(
            full_weight_shape=(4096, 4096), partition_weight_shape=(4096, 4096), weight_type=scalar_types.uint4,
            act_type=torch.bfloat16, group_size=group_size(quant_config), zero_points=True,
        )  # fmt: skip
        try:
            kernel = choose_mp_linear_kernel(config)
        except ValueError as exc:
            return f"no int4 GEMM with zero points for this CPU: {exc}"
        if kernel.__name__ == "CPUWNA16LinearKernel" and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
            return "CPUWNA16LinearKernel's op cpu_gemm_wna16 is not in this CPU's vLLM kernel build (AVX2)"
        return None

    def linear_params(
        self, k: int, parts: list[int], input_size: int, quant_config: dict[str, Any] | None
    ) -> dict[str, LinearParam]:
        """As AutoAWQMarlinLinearMethod registers them (packed along the output dim)."""
        n, groups, i32 = (
            sum(parts),
            (1 if group_size(quant_config) == -1 else k // group_size(quant_config)),
            torch.int32,
        )
        return {
            "qweight": LinearParam((k, n // 8), i32, "packed", 0, 1, packed_dim=1, packed_factor=8),
            "qzeros": LinearParam((groups, n // 8), i32, "packed", 0, 1, packed_dim=1, packed_factor=8),
            "scales": LinearParam((groups, n), None, "group_scale", input_dim=0, output_dim=1),
        }

    def expert_params(
        self, experts: int, hidden: int, inter: int, w13_shards: int, quant_config: dict[str, Any] | None
    ) -> dict[str, dict[str, ExpertParam]]:
        """As AutoAWQMoEMethod registers them: [E, K, N/8], transposed, GROUP-loaded."""
        g = group_size(quant_config)
        g13, g2 = (hidden // g, inter // g) if g != -1 else (1, 1)
        inter2, i32 = w13_shards * inter, torch.int32
        attrs = {"quant_method": "group", "is_transposed": True}
        return {
            "w13": {
                "qweight": ExpertParam((experts, hidden, inter2 // 8), i32, attrs),
                "scales": ExpertParam((experts, g13, inter2), None, attrs),
                "qzeros": ExpertParam((experts, g13, inter2 // 8), i32, attrs),
            },
            "w2": {
                "qweight": ExpertParam((experts, inter, hidden // 8), i32, attrs),
                "scales": ExpertParam((experts, g2, hidden), None, attrs),
                "qzeros": ExpertParam((experts, g2, hidden // 8), i32, attrs),
            },
        }

    # --- tensor-parallel rules -----------------------------------------------------------------------------------
    def linear_rule(
        self, shard: LinearShard, quant_config: dict[str, Any], dtype: str, capability: int
    ) -> tuple[str, str, str]:
        """quantization/auto_awq.py:AutoAWQConfig.get_quant_method on CUDA:
        AutoAWQMarlinLinearMethod when marlin_utils.check_marlin_supported(uint4,
        group, zp) (group -1/32/64/128, validated at detection) and
        check_marlin_supports_layer(allow_tile_padding=True) accept the shard
        (only a quant group straddling ranks is refused; tile misalignment is
        padded), else AutoAWQLinearMethod (the AWQ GEMM), whose create_weights
        raises when the rank's input is not whole groups or its output % 8."""
        g, k = group_size(quant_config), shard.k
        if any(part % 8 for part in shard.parts):
            why = f"output partitions {list(shard.parts)} are not whole int32 words of 8 columns (qweight [in, out/8])"
            return "AutoAWQMarlinLinearMethod", FAILS, why
        if g == -1 or g >= shard.k_full or k % g == 0:
            return "AutoAWQMarlinLinearMethod: Marlin", OK, ""
        why = (
            f"input_size_per_partition {k} is not a whole number of AWQ groups of {g}: check_marlin_supports_layer "
            "refuses it, and AutoAWQLinearMethod.create_weights raises (input size not aligned with the quantized "
            "weight shape)"
        )
        return "AutoAWQLinearMethod", FAILS, why

    def moe_rule(
        self, inter: int, geometry: Geometry, parallel: Parallel, quant_config: dict[str, Any]
    ) -> tuple[str, str, str]:
        """AutoAWQConfig.get_quant_method: AutoAWQMoEMethod (Marlin MoE) when
        check_moe_marlin_supports_layer(allow_tile_padding=True) holds (hidden %
        128, intermediate per rank % group), else MoeWNA16Config(full_config)
        (quant_method awq): MoeWNA16Method.create_weights halves the group size
        until it divides both sizes and asserts it stays >= 32."""
        g = group_size(quant_config)
        if geometry.hidden % 128 == 0 and (g <= 0 or inter % g == 0):
            return "AutoAWQMoEMethod: Marlin MoE", OK, ""
        why = f"Marlin MoE needs hidden % 128 and intermediate_size_per_partition {inter} % {g} == 0"
        wg = g
        while wg > 0 and (inter % wg or geometry.hidden % wg):
            wg //= 2
            if wg < 32:
                return "MoeWNA16Method", FAILS, why + f"; MoeWNA16Method asserts a regrouped group size >= 32 ({wg})"
        return f"MoeWNA16Method (Triton, group {wg})", FALLBACK, why

    # --- export --------------------------------------------------------------------------------------------------
    def export_scheme(self, quant_config: dict[str, Any], where: str) -> ExportScheme:
        """``pack-quantized`` W4A16, group strategy, asymmetric (int4 codes
        with zero points, as vLLM's CompressedTensorsWNA16 reads them)."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

        g = group_size(quant_config)
        weights = QuantizationArgs(
            num_bits=4, type=QuantizationType.INT, symmetric=False, dynamic=False,
            strategy=QuantizationStrategy.CHANNEL if g == -1 else QuantizationStrategy.GROUP,
            group_size=None if g == -1 else g,
        )  # fmt: skip
        return ExportScheme(self.name, weights)

    def export_member(
        self, name: str, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, scheme: Any, where: str
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """The codes keep their values: compressed-tensors stores asymmetric
        int4 as ``q - 8`` packed along the input dim (``weight_packed`` [N,
        K/8]) with ``weight_zero_point`` ``zero - 8`` packed along the output
        dim, and ``weight_scale`` [N, K/g]; the check compares unpacked codes."""
        from compressed_tensors.compressors import BaseCompressor

        zeros = awq_unpack(tensors["qzeros"])  # [G, N]
        state = {
            "weight": self.dequantize(tensors, quant_config, torch.float64),
            "weight_scale": tensors["scales"].t().contiguous(),
            "weight_zero_point": (zeros - 8).t().to(torch.int8).contiguous(),
        }
        out = BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme)
        codes = unpack_bits(out["weight_packed"], 1, 4)  # [N, K], q - 8 + 8 offset kept unsigned
        return out, torch.equal(codes.t(), awq_unpack(tensors["qweight"]))


AWQ = Awq()
