"""GPTQ in the v1 checkpoint layout (AutoGPTQ / GPTQModel, read by vLLM's
``AutoGPTQConfig``: Machete or Marlin linears, Marlin MoE), 4-bit; the 8-bit
variant (``gptq_int8``) subclasses it. Both read ``desc_act: true`` and GPTQModel's negative ``dynamic`` rules (``gptq_dynamic``).

Per quantized linear with K inputs, N outputs, group size g and p = 32 // bits
values per word: ``qweight`` int32 [K/p, N] (p values along K, lowest bits
first), ``qzeros`` int32 [K/g, N/p] (packed along N), ``scales`` fp16 [K/g, N],
``g_idx`` int32 [K]. The v1 layout stores the zero point minus one, so a
symmetric 4-bit checkpoint's qzeros words are all 0x77777777 (zero point 8).
real weight[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].
Without act-order ``g_idx[k] = k // g`` (vLLM recomputes it); with
``desc_act: true`` it is a permutation's positions // g (``act_order_g_idx``)
and the checkpoint must hold it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_mixed.errors import MixedError
from vllm_mixed.formats.base import ExpertParam, ExportScheme, Format, LinearParam, TensorSpec, TinyLayout
from vllm_mixed.formats.gptq_dynamic import dynamic_problems, skipped_by_dynamic
from vllm_mixed.formats.gptq_pack import act_order_g_idx, dequantize_stacked, fp16_scale, pack_bits, unpack_bits
from vllm_mixed.formats.gptq_rules import gptq_linear_rule, gptq_moe_rule
from vllm_mixed.parallel import HOPPER

if TYPE_CHECKING:
    from vllm_mixed.models.base import Geometry, Layer
    from vllm_mixed.parallel import LinearShard, Parallel

__all__ = ["GPTQ_INT4", "GPTQ_QUANT_CONFIG", "GptqInt4", "act_order", "dequantize_stacked", "group_length", "pack_int4",
           "unpack_int4"]  # fmt: skip

GPTQ_METHODS = ("gptq", "gptq_marlin", "auto_gptq")

# As published for Qwen/Qwen3-30B-A3B-GPTQ-Int4.
GPTQ_QUANT_CONFIG: dict[str, Any] = {
    "bits": 4,
    "checkpoint_format": "gptq",
    "damp_percent": 0.01,
    "desc_act": False,
    "group_size": 128,
    "model_file_base_name": None,
    "model_name_or_path": None,
    "quant_method": "gptq",
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
}


def pack_int4(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack 4-bit values (0..15) eight to an int32 word along ``dim``."""
    return pack_bits(values, dim, 4)


def unpack_int4(words: torch.Tensor, dim: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_int4`."""
    return unpack_bits(words, dim, 4, dtype)


def group_size(quant_config: dict[str, Any] | None) -> int:
    """The config's group size; -1: channelwise (one group spanning the input)."""
    return int((quant_config or {}).get("group_size", 128))


def group_length(quant_config: dict[str, Any] | None, k: int) -> int:
    """Input columns per group of a linear with ``k`` inputs (channelwise: ``k``)."""
    g = group_size(quant_config)
    return k if g == -1 else g


def act_order(quant_config: dict[str, Any] | None) -> bool:
    """``desc_act: true`` with groups (AutoGPTQConfig: channelwise act-order is a no-op)."""
    return bool((quant_config or {}).get("desc_act")) and group_size(quant_config) != -1


class GptqInt4(Format):
    name = "gptq_int4"
    description = "gptq (4-bit)"
    tiny = TinyLayout("gptq-int4", GPTQ_QUANT_CONFIG, "float16", "int4")
    moe_kernels = {HOPPER: "humming"}  # H200: 1.11x Marlin's throughput (benchmarks/RESULTS.md, "MoE backend")
    bits = 4

    def measured_moe_backend(self, capability: int, quant_config: dict[str, Any] | None) -> str | None:
        # measured for 4-bit without act-order only; Humming's GPTQ schema asserts desc_act false
        if self.bits != 4 or (quant_config or {}).get("desc_act"):
            return None
        return super().measured_moe_backend(capability, quant_config)

    def int4_group_length(self, quant_config: dict[str, Any], k: int) -> int | None:
        return group_length(quant_config, k) if self.bits == 4 else None

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def sym_zeros(self) -> int:
        """A qzeros word of zero points 2**(bits-1), stored minus one (v1)."""
        return int(pack_bits(torch.full((self.per_word,), 2 ** (self.bits - 1) - 1), 0, self.bits))

    def claims(self, quant_config: dict[str, Any]) -> bool:
        return str(quant_config.get("quant_method", "")).lower() in GPTQ_METHODS and quant_config.get("bits") != 8

    def validate(self, quant_config: dict[str, Any], where: str) -> None:
        problems = []
        if quant_config.get("bits") != self.bits:
            problems.append(f"bits={quant_config.get('bits')!r} (4 and 8 are supported: vLLM's GPTQ kernels)")
        if quant_config.get("checkpoint_format", "gptq") != "gptq":
            problems.append(f"checkpoint_format={quant_config.get('checkpoint_format')!r} (only the v1 'gptq' layout)")
        g = quant_config.get("group_size")
        if not isinstance(g, int) or isinstance(g, bool) or (g <= 0 and g != -1):
            problems.append(f"group_size={g!r} (needs a positive group size such as 128, or -1: channelwise)")
        problems += dynamic_problems(quant_config)
        if problems:
            raise MixedError(f"{where}: unsupported GPTQ checkpoint: " + "; ".join(problems))

    def converts(self, quant_config: dict[str, Any] | None, layer: Layer, where: str) -> bool:
        """Not a layer a negative ``dynamic`` rule names (GPTQModel leaves it in float)."""
        return super().converts(quant_config, layer, where) and not skipped_by_dynamic(quant_config, layer, where)

    def precision(self, quant_config: dict[str, Any] | None, dtype: str = "bfloat16") -> str:
        g = group_size(quant_config)
        return (
            f"int{self.bits}-" + ("channel" if g == -1 else f"g{g}") + ("-actorder" if act_order(quant_config) else "")
        )

    def specs(self, out_features: int, in_features: int, quant_config: dict[str, Any] | None) -> dict[str, TensorSpec]:
        g, p = group_length(quant_config, in_features), self.per_word
        k, n = in_features, out_features
        return {
            "qweight": TensorSpec(("I32",), (k // p, n)),
            "qzeros": TensorSpec(("I32",), (k // g, n // p)),
            "scales": TensorSpec(("F16", "BF16"), (k // g, n)),
            # vLLM recomputes it without act-order; with desc_act: true it is the column order
            "g_idx": TensorSpec(("I32",), (k,), optional=not act_order(quant_config)),
        }

    def missing_hint(self, suffix: str, quant_config: dict[str, Any] | None) -> str:
        if suffix == "g_idx":
            return (
                "the config declares desc_act: true (act-order), whose column-to-group map is this tensor; without "
                "it the weights cannot be decoded. Use the complete checkpoint, or fix desc_act if it is not act-order"
            )
        return ""

    def runtime_dtype(self, suffix: str, model_dtype: torch.dtype) -> torch.dtype | None:
        return model_dtype if suffix == "scales" else None  # vLLM allocates scales in the model dtype

    def quantize(self, weight: torch.Tensor, quant_config: dict[str, Any] | None, **_: Any) -> dict[str, torch.Tensor]:
        """Round-to-nearest GPTQ packing (no calibration); symmetric unless the
        config says ``sym: false``; with ``desc_act: true`` the groups follow
        :func:`act_order_g_idx`. Scales are rounded to fp16 first so the stored
        tensors dequantize exactly to what the reference computes."""
        bits, p = self.bits, self.per_word
        maxq = 2**bits - 1
        sym = (quant_config or {}).get("sym", True)
        n, k = weight.shape
        g = group_length(quant_config, k)
        if k % g or k % p or n % p:
            raise ValueError(f"GPTQ needs in_features % {g} == 0 and dims % {p} == 0, got [{n}, {k}]")
        g_idx = act_order_g_idx(k, g) if act_order(quant_config) else (torch.arange(k) // g).to(torch.int32)
        order = torch.argsort(g_idx.to(torch.int64), stable=True).to(weight.device)  # the columns of group 0, 1, ...
        w = weight.to(torch.float64).t()[order].reshape(k // g, g, n)  # [groups, g, N]
        if sym:
            amax = w.abs().amax(dim=1)
            scale = fp16_scale(2 * amax / maxq)
            zero = torch.full_like(amax, 2 ** (bits - 1), dtype=torch.int64)
        else:
            lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
            # v1 cannot store zero point 0 (it stores zero - 1), so the top of
            # the range is at most maxq - 0.5 steps above zero when the group is >= 0
            scale = fp16_scale(torch.maximum((hi - lo) / maxq, hi / (maxq - 0.5)))
            zero = torch.round(-lo / scale.to(torch.float64)).clamp(1, maxq).to(torch.int64)
        q = torch.round(w / scale.to(torch.float64).unsqueeze(1)) + zero.unsqueeze(1)
        q_sorted = q.clamp(0, maxq).to(torch.int64).reshape(k, n)
        q = torch.empty_like(q_sorted)
        q[order] = q_sorted
        return {
            "qweight": pack_bits(q, 0, bits),
            "qzeros": pack_bits(zero - 1, 1, bits),  # v1 layout stores zero - 1
            "scales": scale.contiguous(),
            "g_idx": g_idx.to(weight.device),
        }

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        q = unpack_bits(tensors["qweight"], 0, self.bits)  # [K, N]
        k = q.shape[0]
        zeros = unpack_bits(tensors["qzeros"], 1, self.bits) + 1  # [G, N]
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            g_idx = torch.arange(k, device=q.device) // group_length(quant_config, k)
        g_idx = g_idx.to(torch.int64)
        if g_idx.numel() and int(g_idx.min()) < 0:
            raise MixedError("an act-order GPTQ layer's g_idx was not loaded (still -1); report this with the recipe")
        scales = tensors["scales"].to(dtype)
        w = (q - zeros[g_idx]).to(dtype) * scales[g_idx]
        return w.t()

    def dequantize_experts(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        q, z, s = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        if "g_idx" not in tensors:
            return dequantize_stacked(q, z, s, group_size(quant_config), torch.float32, out_dtype, bits=self.bits)
        g_idx = tensors["g_idx"]  # act-order: one expert at a time, each with its own column order
        return torch.stack([
            self.dequantize({"qweight": q[e], "qzeros": z[e], "scales": s[e], "g_idx": g_idx[e]}, quant_config,
                            torch.float32).to(out_dtype)
            for e in range(q.shape[0])
        ])  # fmt: skip

    # --- vLLM ----------------------------------------------------------------------------------------------------
    def vllm_methods(self) -> tuple[str, str]:
        return "AutoGPTQLinearMethod", "AutoGPTQMoEMethod"

    def vllm_config(self, quant_config: dict[str, Any], quantized_modules: list[str]) -> Any:
        """vLLM fills modules_in_block_to_quantize from safetensors dtypes in
        maybe_update_config, never called for a sub-config; the MoE-WNA16
        fallback needs quant_method in the dict. vLLM >= 0.27 refuses
        desc_act: true (gptq_utils.normalize_and_validate_gptq_desc_act): on its
        CPU build every such layer runs on the fallback (``cpu_kernel``), so
        there is no config; on CUDA it is an error."""
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
        from vllm.platforms import current_platform

        cfg = {**quant_config, "quant_method": "gptq", "modules_in_block_to_quantize": list(quantized_modules)}
        try:
            return AutoGPTQConfig.from_config(cfg)
        except ValueError as exc:
            if not act_order(quant_config):
                raise
            if current_platform.is_cpu():
                return None
            raise MixedError(
                f"a GPTQ source has desc_act: true, which this vLLM refuses ({exc}); vLLM 0.26 runs act-order GPTQ on "
                "Marlin. Route its layers to a desc_act: false, AWQ or bf16 source"
            ) from None

    def cpu_kernel(self, kind: str, quant_config: dict[str, Any]) -> str | None:
        """vLLM's CPU int4 GEMMs (``choose_mp_linear_kernel`` on this
        platform's list) and int4 MoE experts (its WNA16 oracle's CPU
        backends), each by its own checks; CPUWNA16LinearKernel's op
        ``cpu_gemm_wna16`` is missing from the AVX2 build, which its checks
        do not see (it would fail at the first forward). Act-order has no
        kernel in vLLM >= 0.27 (its config refuses it)."""
        if act_order(quant_config):
            return "vLLM >= 0.27 has no act-order GPTQ kernel (desc_act: true is refused by AutoGPTQConfig)"
        if kind == "experts":
            if self.bits != 4:
                return f"vLLM's CPU MoE experts are int4 only (CPUExpertsInt4), this source is int{self.bits}"
            from vllm.model_executor.layers.fused_moe.oracle import int_wna16 as oracle

            classes = list(oracle.backend_to_kernel_cls(oracle.WNA16MoEBackend.CPU))
            if any(c._supports_current_device() for c in classes):
                return None
            return f"no int4 MoE experts for this CPU: {', '.join(c.__name__ for c in classes)} do not support it"
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
        from vllm.scalar_type import scalar_types

        sym = bool(quant_config.get("sym", True))
        weight_type = {(4, True): scalar_types.uint4b8, (4, False): scalar_types.uint4, (8, True): scalar_types.uint8b128,
                       (8, False): scalar_types.uint8}[(self.bits, sym)]  # fmt: skip
        # a representative shape: the CPU kernels' checks that depend on it (K, N % 32) hold for real models
        config = MPLinearLayerConfig(
            full_weight_shape=(4096, 4096), partition_weight_shape=(4096, 4096), weight_type=weight_type,
            act_type=torch.bfloat16, group_size=group_size(quant_config), zero_points=not sym,
        )  # fmt: skip
        try:
            kernel = choose_mp_linear_kernel(config)
        except ValueError as exc:
            return f"no int{self.bits} GEMM for this CPU: {exc}"
        if kernel.__name__ == "CPUWNA16LinearKernel" and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
            return "CPUWNA16LinearKernel's op cpu_gemm_wna16 is not in this CPU's vLLM kernel build (AVX2)"
        return None

    def linear_params(
        self, k: int, parts: list[int], input_size: int, quant_config: dict[str, Any] | None
    ) -> dict[str, LinearParam]:
        """As AutoGPTQLinearMethod registers them: the scales and zeros of all
        groups on every rank with act-order (vLLM 0.26; ``g_idx`` split along
        K) and for a channelwise row-parallel shard (one group spanning the
        full input), as marlin_utils.marlin_repeat_scales_on_all_ranks says."""
        p, n, i32 = self.per_word, sum(parts), torch.int32
        group = group_length(quant_config, input_size)
        params = {"qweight": LinearParam((k // p, n), i32, "packed", 0, 1, packed_dim=0, packed_factor=p)}
        if act_order(quant_config) or (group_size(quant_config) == -1 and k != input_size):
            params |= {
                "scales": LinearParam((input_size // group, n), None, "channel_scale", None, 1),
                "qzeros": LinearParam((input_size // group, n // p), i32, "packed_column", None, 1, 1, p),
            }
            if act_order(quant_config):  # -1: never loaded (dequantize says so)
                params["g_idx"] = LinearParam((k,), i32, "row", 0, None, fill=-1)
            return params
        return params | {
            "scales": LinearParam((k // group, n), None, "group_scale", input_dim=0, output_dim=1),
            "qzeros": LinearParam((k // group, n // p), i32, "packed", 0, 1, packed_dim=1, packed_factor=p),
        }

    def expert_params(
        self, experts: int, hidden: int, inter: int, w13_shards: int, quant_config: dict[str, Any] | None
    ) -> dict[str, dict[str, ExpertParam]]:
        """As AutoGPTQMoEMethod registers them: transposed, GROUP-loaded; with act-order a ``g_idx`` per
        expert shared by gate and up (as vLLM 0.26's Marlin MoE), for the fallback's ``own_loader``."""
        g, p = group_size(quant_config), self.per_word
        inter2 = w13_shards * inter
        g13, g2 = hidden // group_length(quant_config, hidden), inter // group_length(quant_config, inter)
        attrs = {"quant_method": "group" if g != -1 else "channel", "is_transposed": True}
        i32 = torch.int32
        params = {
            "w13": {
                "qweight": ExpertParam((experts, hidden // p, inter2), i32, attrs),
                "scales": ExpertParam((experts, g13, inter2), None, attrs),
                "qzeros": ExpertParam((experts, g13, inter2 // p), i32, attrs),
            },
            "w2": {
                "qweight": ExpertParam((experts, inter // p, hidden), i32, attrs),
                "scales": ExpertParam((experts, g2, hidden), None, attrs),
                "qzeros": ExpertParam((experts, g2, hidden // p), i32, attrs),
            },
        }
        if act_order(quant_config):  # -1: never loaded (dequantize says so)
            params["w13"]["g_idx"] = ExpertParam((experts, hidden), i32, {"own_loader": "g_idx"}, fill=-1)
            params["w2"]["g_idx"] = ExpertParam((experts, inter), i32, {"own_loader": "g_idx"}, fill=-1)
        return params

    # --- tensor-parallel rules (gptq_rules restates vLLM 0.26's CUDA checks) -----------------------------------
    def linear_rule(
        self, shard: LinearShard, quant_config: dict[str, Any], dtype: str, capability: int
    ) -> tuple[str, str, str]:
        return gptq_linear_rule(self.bits, shard, group_size(quant_config), act_order(quant_config), dtype,
                                      capability)  # fmt: skip

    def moe_rule(
        self, inter: int, geometry: Geometry, parallel: Parallel, quant_config: dict[str, Any]
    ) -> tuple[str, str, str]:
        return gptq_moe_rule(inter, geometry.hidden, group_size(quant_config), act_order(quant_config))

    # --- export --------------------------------------------------------------------------------------------------
    def export_scheme(self, quant_config: dict[str, Any], where: str) -> ExportScheme:
        """``pack-quantized`` W4A16 / W8A16: group strategy with the source's
        group size, channel strategy for a channelwise source."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

        if not quant_config.get("sym", True):
            raise MixedError(
                f"{where}: GPTQ with sym: false is not exported; vLLM's pack-quantized W{self.bits}A16 here is "
                f"symmetric (zero point {2 ** (self.bits - 1)}). Route these layers to a symmetric GPTQ checkpoint, "
                "or to the bf16/fp8 source"
            )
        if act_order(quant_config):
            raise MixedError(
                f"{where}: GPTQ with desc_act: true is not exported; its groups are not contiguous, which "
                "compressed-tensors can only write as weight_g_idx (actorder: group), and vLLM 0.32 no longer "
                "reads that. Route these layers to a desc_act: false checkpoint, or to the bf16/fp8 source"
            )
        g = group_size(quant_config)
        strategy = QuantizationStrategy.CHANNEL if g == -1 else QuantizationStrategy.GROUP
        weights = QuantizationArgs(
            num_bits=self.bits, type=QuantizationType.INT, strategy=strategy,
            group_size=None if g == -1 else g, symmetric=True, dynamic=False,
        )  # fmt: skip
        return ExportScheme(self.name, weights)

    def export_member(
        self, name: str, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, scheme: Any, where: str
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """The codes keep their bits: compressed-tensors packs ``q - 2**(bits-1)``
        32 // bits to an int32 along the input dimension, lowest bits first,
        which is exactly GPTQ's ``qweight`` transposed; ``scales`` [K/g, N]
        becomes ``weight_scale`` [N, K/g] in its source dtype."""
        from compressed_tensors.compressors import BaseCompressor

        qweight, scales, g_idx = tensors["qweight"], tensors["scales"], tensors.get("g_idx")
        if not bool((tensors["qzeros"] == self.sym_zeros).all()):
            raise MixedError(
                f"{where}: tensor {name}.qzeros is not all {self.sym_zeros:#010x} (zero point "
                f"{2 ** (self.bits - 1)}), although the checkpoint declares sym: true; it is asymmetric or damaged: fix "
                "its config.json, or route the layer to another source"
            )
        k = qweight.shape[0] * self.per_word
        group = scheme.weights.group_size or k  # channel strategy: one group
        if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // group):
            raise MixedError(
                f"{where}: tensor {name}.g_idx is not arange(in) // {group} (act-order GPTQ); pack-quantized has no "
                "column permutation: route the layer to a desc_act: false checkpoint"
            )
        weight = self.dequantize(tensors, quant_config, torch.float64)
        state = {"weight": weight, "weight_scale": scales.t().contiguous()}
        out = BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme)
        return out, torch.equal(out["weight_packed"], qweight.t())  # both: codes unsigned, along in, low bits first


GPTQ_INT4 = GptqInt4()
