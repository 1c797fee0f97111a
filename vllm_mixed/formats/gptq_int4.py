"""GPTQ int4 in the v1 checkpoint layout (AutoGPTQ / GPTQModel, read by
vLLM's ``AutoGPTQConfig``: Machete or Marlin linears, Marlin MoE).

Per quantized linear with K inputs, N outputs and group size g:
``qweight`` int32 [K/8, N] (eight 4-bit values along K, lowest nibble first),
``qzeros`` int32 [K/g, N/8] (packed along N), ``scales`` fp16 [K/g, N],
``g_idx`` int32 [K]. The v1 layout stores the zero point minus one, so a
symmetric checkpoint's qzeros words are all 0x77777777 (zero point 8).
real weight[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_mixed.errors import MixedError
from vllm_mixed.formats.base import ExpertParam, ExportScheme, Format, LinearParam, TensorSpec, TinyLayout
from vllm_mixed.parallel import FAILS, FALLBACK, HOPPER, OK

if TYPE_CHECKING:
    from vllm_mixed.models.base import Geometry
    from vllm_mixed.parallel import LinearShard, Parallel

__all__ = ["GPTQ_INT4", "GPTQ_QUANT_CONFIG", "dequantize_stacked", "pack_int4", "unpack_int4"]

BITS = 4
PER_WORD = 32 // BITS  # 8
MAXQ = 2**BITS - 1  # 15
SYM_ZEROS = 0x77777777  # v1 stores zero point - 1: eight nibbles of 7 is zero point 8

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
    """Pack 4-bit values (0..15) eight to an int32 word along ``dim``
    (value j of a word in bits 4j..4j+3)."""
    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % PER_WORD:
        raise ValueError(f"cannot pack {v.shape[-1]} values eight to a word")
    if v.numel() and (v.min() < 0 or v.max() > MAXQ):
        raise ValueError("int4 values must lie in 0..15")
    v = v.reshape(*v.shape[:-1], -1, PER_WORD)
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=v.device)
    words = (v << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int4(words: torch.Tensor, dim: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 words -> values 0..15 in ``dtype``.
    Unpacked in int32 (the arithmetic shift's sign bits are masked off), a
    quarter of the traffic of int64; ``dtype=torch.int32`` skips the cast."""
    d = dim % words.dim()
    shape = [1] * (words.dim() + 1)
    shape[d + 1] = PER_WORD
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=words.device).view(shape)
    v = ((words.to(torch.int32).unsqueeze(d + 1) >> shifts) & MAXQ).flatten(d, d + 1)
    return v.to(dtype)


def dequantize_stacked(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype,
    out_dtype: torch.dtype, chunk: int = 16,
) -> torch.Tensor:  # fmt: skip
    """Experts stacked as vLLM's MoE registers them (``qweight`` [E, K/8, N],
    ``qzeros`` [E, K/g, N/8], ``scales`` [E, K/g, N], sequential groups) to
    [E, N, K] in ``out_dtype``, ``chunk`` experts at a time; equal to
    :meth:`GptqInt4.dequantize` per expert computed in ``dtype``."""
    e, k8, n = qweight.shape
    k = k8 * PER_WORD
    g = k if group == -1 else group
    out = torch.empty(e, n, k, dtype=out_dtype)
    for lo in range(0, e, chunk):
        hi = min(lo + chunk, e)
        # transpose the packed words (1/8 of the values) so every later step writes [N, K] contiguously
        q = unpack_int4(qweight[lo:hi].transpose(1, 2), 2, torch.int32).view(hi - lo, n, k // g, g)
        zeros = (unpack_int4(qzeros[lo:hi], 2, torch.int32) + 1).transpose(1, 2).unsqueeze(3)
        w = (q - zeros).to(dtype) * scales[lo:hi].transpose(1, 2).to(dtype).unsqueeze(3)
        out[lo:hi] = w.view(hi - lo, n, k)
    return out


def _fp16_scale(need: torch.Tensor) -> torch.Tensor:
    """``need`` (float64) as an fp16 scale that is never smaller: rounding it
    down would push a group's extremes past the last step (error > scale/2).
    Never zero, so all-zero groups quantize to exact zeros."""
    scale = need.clamp(min=2**-24).to(torch.float16)
    up = torch.nextafter(scale, torch.tensor(torch.inf, dtype=torch.float16, device=scale.device))
    return torch.where(scale.to(torch.float64) < need, up, scale)


def group_size(quant_config: dict[str, Any] | None) -> int:
    return int((quant_config or {}).get("group_size", 128))


class GptqInt4(Format):
    name = "gptq_int4"
    description = "gptq (4-bit)"
    tiny = TinyLayout("gptq-int4", GPTQ_QUANT_CONFIG, "float16", "int4")
    moe_kernels = {HOPPER: "humming"}  # H200: 1.11x Marlin's throughput (benchmarks/RESULTS.md, "MoE backend")

    def claims(self, quant_config: dict[str, Any]) -> bool:
        return str(quant_config.get("quant_method", "")).lower() in ("gptq", "gptq_marlin", "auto_gptq")

    def validate(self, quant_config: dict[str, Any], where: str) -> None:
        problems = []
        if quant_config.get("bits") != 4:
            problems.append(f"bits={quant_config.get('bits')!r} (only 4 is supported)")
        if quant_config.get("checkpoint_format", "gptq") != "gptq":
            problems.append(f"checkpoint_format={quant_config.get('checkpoint_format')!r} (only the v1 'gptq' layout)")
        if quant_config.get("desc_act"):
            problems.append("desc_act=true (vLLM >= 0.27 rejects act-order GPTQ; use a desc_act=false checkpoint)")
        if not isinstance(quant_config.get("group_size"), int) or quant_config["group_size"] <= 0:
            problems.append(f"group_size={quant_config.get('group_size')!r} (needs a positive group size such as 128)")
        if problems:
            raise MixedError(f"{where}: unsupported GPTQ checkpoint: " + "; ".join(problems))

    def precision(self, quant_config: dict[str, Any] | None, dtype: str = "bfloat16") -> str:
        return f"int4-g{group_size(quant_config)}"

    def specs(self, out_features: int, in_features: int, quant_config: dict[str, Any] | None) -> dict[str, TensorSpec]:
        g = group_size(quant_config)
        k, n = in_features, out_features
        return {
            "qweight": TensorSpec(("I32",), (k // PER_WORD, n)),
            "qzeros": TensorSpec(("I32",), (k // g, n // PER_WORD)),
            "scales": TensorSpec(("F16", "BF16"), (k // g, n)),
            "g_idx": TensorSpec(("I32",), (k,), optional=True),  # vLLM recomputes it without act-order
        }

    def runtime_dtype(self, suffix: str, model_dtype: torch.dtype) -> torch.dtype | None:
        return model_dtype if suffix == "scales" else None  # vLLM allocates scales in the model dtype

    def quantize(self, weight: torch.Tensor, quant_config: dict[str, Any] | None, **_: Any) -> dict[str, torch.Tensor]:
        """Round-to-nearest GPTQ packing (no calibration); symmetric unless the
        config says ``sym: false``. Scales are rounded to fp16 first so the
        stored tensors dequantize exactly to what the reference computes."""
        g = group_size(quant_config)
        sym = (quant_config or {}).get("sym", True)
        n, k = weight.shape
        if k % g or k % PER_WORD or n % PER_WORD:
            raise ValueError(f"GPTQ needs in_features % {g} == 0 and dims % 8 == 0, got [{n}, {k}]")
        w = weight.to(torch.float64).t().reshape(k // g, g, n)  # [groups, g, N]
        if sym:
            amax = w.abs().amax(dim=1)
            scale = _fp16_scale(2 * amax / MAXQ)
            zero = torch.full_like(amax, 8, dtype=torch.int64)
        else:
            lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
            # v1 cannot store zero point 0 (it stores zero - 1), so the top of
            # the range is at most 14.5 steps above zero when the group is >= 0
            scale = _fp16_scale(torch.maximum((hi - lo) / MAXQ, hi / (MAXQ - 0.5)))
            zero = torch.round(-lo / scale.to(torch.float64)).clamp(1, MAXQ).to(torch.int64)
        s64 = scale.to(torch.float64)
        q = torch.round(w / s64.unsqueeze(1)) + zero.unsqueeze(1)
        q = q.clamp(0, MAXQ).to(torch.int64).reshape(k, n)
        return {
            "qweight": pack_int4(q, dim=0),
            "qzeros": pack_int4(zero - 1, dim=1),  # v1 layout stores zero - 1
            "scales": scale.contiguous(),
            "g_idx": (torch.arange(k, device=weight.device) // g).to(torch.int32),
        }

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        q = unpack_int4(tensors["qweight"], dim=0)  # [K, N]
        k = q.shape[0]
        zeros = unpack_int4(tensors["qzeros"], dim=1) + 1  # [G, N]
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            g_idx = torch.arange(k, device=q.device) // group_size(quant_config)
        g_idx = g_idx.to(torch.int64)
        scales = tensors["scales"].to(dtype)
        w = (q - zeros[g_idx]).to(dtype) * scales[g_idx]
        return w.t()

    def dequantize_experts(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        q, z, s = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        return dequantize_stacked(q, z, s, group_size(quant_config), torch.float32, out_dtype)

    # --- vLLM ----------------------------------------------------------------------------------------------------
    def vllm_methods(self) -> tuple[str, str]:
        return "AutoGPTQLinearMethod", "AutoGPTQMoEMethod"

    def vllm_config(self, quant_config: dict[str, Any], quantized_modules: list[str]) -> Any:
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

        # vLLM fills modules_in_block_to_quantize from safetensors dtypes in
        # maybe_update_config, which is never called for a sub-config; the
        # MoE-WNA16 fallback needs quant_method in the dict.
        cfg = {**quant_config, "quant_method": "gptq", "modules_in_block_to_quantize": list(quantized_modules)}
        return AutoGPTQConfig.from_config(cfg)

    def cpu_kernel(self, kind: str, quant_config: dict[str, Any]) -> str | None:
        """vLLM's CPU int4 GEMMs (``choose_mp_linear_kernel`` on this
        platform's list) and int4 MoE experts (its WNA16 oracle's CPU
        backends), each by its own checks; CPUWNA16LinearKernel's op
        ``cpu_gemm_wna16`` is missing from the AVX2 build, which its checks
        do not see (it would fail at the first forward)."""
        import torch

        if kind == "experts":
            from vllm.model_executor.layers.fused_moe.oracle import int_wna16 as oracle

            backends = [oracle.WNA16MoEBackend.CPU]
            classes = [c for b in backends for c in oracle.backend_to_kernel_cls(b)]
            if any(c._supports_current_device() for c in classes):
                return None
            return f"no int4 MoE experts for this CPU: {', '.join(c.__name__ for c in classes)} do not support it"
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
        from vllm.scalar_type import scalar_types

        g = group_size(quant_config)
        sym = bool(quant_config.get("sym", True))
        # a representative shape: the CPU kernels' checks that depend on it (K, N % 32) hold for real models
        config = MPLinearLayerConfig(
            full_weight_shape=(4096, 4096),
            partition_weight_shape=(4096, 4096),
            weight_type=scalar_types.uint4b8 if sym else scalar_types.uint4,
            act_type=torch.bfloat16,
            group_size=g,
            zero_points=not sym,
        )  # fmt: skip (act-order is refused at detection)
        try:
            kernel = choose_mp_linear_kernel(config)
        except ValueError as exc:
            return f"no int4 GEMM for this CPU: {exc}"
        if kernel.__name__ == "CPUWNA16LinearKernel" and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
            return "CPUWNA16LinearKernel's op cpu_gemm_wna16 is not in this CPU's vLLM kernel build (AVX2)"
        return None

    def linear_params(
        self, k: int, parts: list[int], input_size: int, quant_config: dict[str, Any] | None
    ) -> dict[str, LinearParam]:
        """As AutoGPTQLinearMethod registers them (act-order is refused earlier)."""
        g = group_size(quant_config)
        n, group = sum(parts), g if g != -1 else input_size
        i32 = torch.int32
        return {
            "qweight": LinearParam((k // PER_WORD, n), i32, "packed", 0, 1, packed_dim=0, packed_factor=PER_WORD),
            "scales": LinearParam((k // group, n), None, "group_scale", input_dim=0, output_dim=1),
            "qzeros": LinearParam((k // group, n // PER_WORD), i32, "packed", 0, 1, packed_dim=1, packed_factor=PER_WORD),
        }  # fmt: skip

    def expert_params(
        self, experts: int, hidden: int, inter: int, w13_shards: int, quant_config: dict[str, Any] | None
    ) -> dict[str, dict[str, ExpertParam]]:
        """As AutoGPTQMoEMethod registers them: transposed, GROUP-loaded."""
        g = group_size(quant_config)
        inter2 = w13_shards * inter
        g13, g2 = (hidden // g, inter // g) if g != -1 else (1, 1)
        attrs = {"quant_method": "group" if g != -1 else "channel", "is_transposed": True}
        i32 = torch.int32
        return {
            "w13": {
                "qweight": ExpertParam((experts, hidden // PER_WORD, inter2), i32, attrs),
                "scales": ExpertParam((experts, g13, inter2), None, attrs),
                "qzeros": ExpertParam((experts, g13, inter2 // PER_WORD), i32, attrs),
            },
            "w2": {
                "qweight": ExpertParam((experts, inter // PER_WORD, hidden), i32, attrs),
                "scales": ExpertParam((experts, g2, hidden), None, attrs),
                "qzeros": ExpertParam((experts, g2, hidden // PER_WORD), i32, attrs),
            },
        }

    # --- tensor-parallel rules -----------------------------------------------------------------------------------
    def linear_rule(
        self, shard: LinearShard, quant_config: dict[str, Any], dtype: str, capability: int
    ) -> tuple[str, str, str]:
        """kernels/linear/__init__.py:choose_mp_linear_kernel takes the first of
        its CUDA list whose can_implement accepts the shard (AllSpark: Ampere and
        channelwise only; Conch: optional package, absent from the CUDA wheel):
        MacheteLinearKernel (sm90 only; K % 64, N % 128, machete_utils.
        check_machete_supports_shape), MarlinLinearKernel (without act-order only a
        quant group straddling ranks is refused, tile misalignment is padded; with
        it marlin_utils.check_marlin_supports_shape: N % 64, K % 128),
        ExllamaLinearKernel (fp16 only), TritonW4A16LinearKernel. A quant group
        straddling ranks is refused even where Machete would take it:
        auto_gptq.py:AutoGPTQLinearMethod.create_weights then allocates
        K // group scale rows per rank, and the scales load silently wrong."""
        g = group_size(quant_config)
        act_order = bool(quant_config.get("desc_act")) and g != -1  # AutoGPTQConfig.__init__
        k, n, split_k = shard.k, shard.n, shard.k != shard.k_full
        whole_groups = g == -1 or g >= shard.k_full or k % g == 0
        if not whole_groups:
            why = (
                f"input_size_per_partition {k} is not a whole number of quant groups of {g}: Marlin and Triton refuse "
                "it (can_implement), and AutoGPTQLinearMethod.create_weights would load its scales wrong"
            )
            return "AutoGPTQLinearMethod", FAILS, why
        candidates = [  # in choose_mp_linear_kernel's order, with whole groups per rank
            ("Machete", capability == HOPPER and not (act_order and split_k) and g in (-1, 64, 128)
             and k % 64 == 0 and n % 128 == 0),
            ("Marlin", g in (-1, 32, 64, 128) and (not act_order or (n % 64 == 0 and k % 128 == 0))),
            ("Exllama", dtype == "float16" and not (act_order and split_k) and n % 8 == 0 and g > 0),
            ("TritonW4A16", n % 8 == 0 and not act_order and (g in (-1, 32, 64, 128, 256) or g == shard.k_full)),
        ]  # fmt: skip
        preferred = candidates[0][0] if capability == HOPPER else candidates[1][0]
        for name, accepts in candidates:
            if accepts:
                status = OK if name == preferred else FALLBACK
                why = "" if status == OK else f"{preferred} does not accept [{k} -> {n}] with group {g}"
                return f"AutoGPTQLinearMethod: {name}", status, why
        return "AutoGPTQLinearMethod", FAILS, f"no int4 kernel accepts [{k} -> {n}] (choose_mp_linear_kernel raises)"

    def moe_rule(
        self, inter: int, geometry: Geometry, parallel: Parallel, quant_config: dict[str, Any]
    ) -> tuple[str, str, str]:
        """quantization/auto_gptq.py:AutoGPTQConfig.get_quant_method runs Marlin
        MoE when marlin_utils.check_moe_marlin_supports_layer accepts the layer
        (hidden % 128, group in -1/32/64/128, and with allow_tile_padding=not
        desc_act: intermediate per rank % group; with act-order % max(64, group)),
        else MoeWNA16Config(full_config).get_quant_method: moe_wna16.py:
        MoeWNA16Method.create_weights halves the group size until it divides both
        sizes and asserts it stays >= 32."""
        g = group_size(quant_config)
        act_order = bool(quant_config.get("desc_act")) and g != -1
        tile = max(64, g) if act_order else g
        if g in (-1, 32, 64, 128) and geometry.hidden % 128 == 0 and (g <= 0 or inter % tile == 0):
            pad = "" if act_order or inter % 64 == 0 else " (intermediate tile-padded, marlin_moe_padded_intermediate)"
            return f"AutoGPTQMoEMethod: Marlin MoE{pad}", OK, ""
        why = (
            f"Marlin MoE needs intermediate_size_per_partition {inter} % {tile} == 0 (check_moe_marlin_supports_layer)"
        )
        wg = g
        while wg > 0 and (inter % wg or geometry.hidden % wg):
            wg //= 2
            if wg < 32:
                why += f", and MoeWNA16Method.create_weights asserts a regrouped group size >= 32 ({wg} here)"
                return "MoeWNA16Method", FAILS, why
        why += (
            "; measured on an H100 with vLLM 0.26, the MoE-WNA16 Triton kernel gave 44 % less output throughput than "
            "Marlin at 256 sequences and took 29 % longer per token at batch 1 (benchmarks/RESULTS.md)"
        )
        return f"MoeWNA16Method (Triton, group {wg})", FALLBACK, why

    # --- export --------------------------------------------------------------------------------------------------
    def export_scheme(self, quant_config: dict[str, Any], where: str) -> ExportScheme:
        """``pack-quantized`` W4A16, group strategy, the source's group size."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

        if not quant_config.get("sym", True):
            raise MixedError(
                f"{where}: GPTQ with sym: false is not exported; vLLM's pack-quantized W4A16 here is symmetric "
                "(zero point 8). Route these layers to a symmetric GPTQ checkpoint, or to the bf16/fp8 source"
            )
        weights = QuantizationArgs(
            num_bits=4, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP,
            group_size=group_size(quant_config), symmetric=True, dynamic=False,
        )  # fmt: skip
        return ExportScheme(self.name, weights)

    def export_member(
        self, name: str, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, scheme: Any, where: str
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """The int4 codes keep their bits: compressed-tensors packs ``q - 8``
        eight to an int32 along the input dimension, lowest nibble first, which
        is exactly GPTQ's ``qweight`` transposed; ``scales`` [K/g, N] becomes
        ``weight_scale`` [N, K/g] in its source dtype."""
        from compressed_tensors.compressors import BaseCompressor

        qweight, scales, g_idx = tensors["qweight"], tensors["scales"], tensors.get("g_idx")
        if not bool((tensors["qzeros"] == SYM_ZEROS).all()):
            raise MixedError(
                f"{where}: tensor {name}.qzeros is not all 0x77777777 (zero point 8), although the checkpoint declares "
                "sym: true; it is asymmetric or damaged: fix its config.json, or route the layer to another source"
            )
        k, group = qweight.shape[0] * PER_WORD, scheme.weights.group_size
        if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // group):
            raise MixedError(
                f"{where}: tensor {name}.g_idx is not arange(in) // {group} (act-order GPTQ); pack-quantized has no "
                "column permutation: route the layer to a desc_act: false checkpoint"
            )
        weight = self.dequantize(tensors, quant_config, torch.float64)
        state = {"weight": weight, "weight_scale": scales.t().contiguous()}
        out = BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme)
        return out, torch.equal(out["weight_packed"], qweight.t())  # both: q in 0..15, 8 per word along in, low first


GPTQ_INT4 = GptqInt4()
