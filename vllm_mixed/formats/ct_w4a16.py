"""compressed-tensors ``pack-quantized`` W4A16, as llm-compressor writes it
(RedHatAI's ``*-quantized.w4a16`` checkpoints) and vLLM's
``CompressedTensorsWNA16`` / ``CompressedTensorsWNA16MoEMethod`` read it.

Per quantized linear with N outputs, K inputs and group size g (channel
strategy: g = K): ``weight_packed`` int32 [N, K/8] (the signed code q in
-8..7 stored as q + 8, eight to a word along K, lowest nibble first),
``weight_scale`` [N, K/g] in the model's float dtype, ``weight_shape`` int64
[2] = (N, K), and for asymmetric schemes ``weight_zero_point`` int32
[N/8, K/g] (signed zero points + 8, packed eight to a word along N).
real weight[n, k] = (q[n, k] - zero[n, k // g]) * scale[n, k // g].
(compressed_tensors/compressors/pack_quantized: ``pack_to_int32``.)

This module also claims every other compressed-tensors config that is not
FP8, so that an unsupported one is refused with what is supported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_mixed.errors import MixedError
from vllm_mixed.formats import ct_common as ct
from vllm_mixed.formats.base import ExpertParam, ExportScheme, Format, LinearParam, TensorSpec, TinyLayout
from vllm_mixed.formats.gptq_int4 import GPTQ_INT4, pack_int4, unpack_int4
from vllm_mixed.parallel import FAILS, FALLBACK, OK

if TYPE_CHECKING:
    from vllm_mixed.models.base import Geometry, Layer
    from vllm_mixed.parallel import LinearShard, Parallel

__all__ = ["CT_W4A16", "CT_W4A16_QUANT_CONFIG", "w4a16_config"]

PER_WORD, OFFSET, QMIN, QMAX = 8, 8, -8, 7
SCALE_DTYPES = ("BF16", "F16", "F32")
_TORCH_SCALE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def w4a16_config(group_size: int | None = 128, symmetric: bool = True, ignore: list[str] | None = None) -> dict:
    """A ``quantization_config`` as llm-compressor writes it for W4A16
    (``group_size=None``: channel strategy); ``ignore`` defaults to the
    head and the MoE routers, as RedHatAI's Qwen3-MoE checkpoints list them."""
    weights = {
        "actorder": None, "block_structure": None, "dynamic": False, "group_size": group_size, "num_bits": 4,
        "observer": "minmax", "observer_kwargs": {}, "strategy": "group" if group_size else "channel",
        "symmetric": symmetric, "type": "int",
    }  # fmt: skip
    return {
        "config_groups": {
            "group_0": {
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": ct.PACK_QUANTIZED,
        "ignore": list(ignore) if ignore is not None else ["lm_head", "re:.*mlp.gate$"],
        "kv_cache_scheme": None,
        "quant_method": ct.CT_METHOD,
        "quantization_status": "compressed",
    }


CT_W4A16_QUANT_CONFIG = w4a16_config()


def _group(quant_config: dict[str, Any] | None, k: int) -> int:
    g = ct.scheme(quant_config).group
    return k if g == -1 else g


def _symmetric(quant_config: dict[str, Any] | None) -> bool:
    return ct.scheme(quant_config).weights.symmetric


def _scale_up(need: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``need`` (float64) as a ``dtype`` scale never below it (rounding down
    would push a group's extreme past the last code); never zero."""
    scale = need.clamp(min=2**-24).to(dtype)
    up = torch.nextafter(scale, torch.tensor(torch.inf, dtype=dtype, device=scale.device))
    return torch.where(scale.to(torch.float64) < need, up, scale)


class CtW4A16(Format):
    name = "ct_w4a16"
    description = "compressed-tensors pack-quantized W4A16"
    tiny = TinyLayout("ct-w4a16", CT_W4A16_QUANT_CONFIG, "bfloat16", "ctint4")

    # --- detection -----------------------------------------------------------------------------------------------
    def claims(self, quant_config: dict[str, Any]) -> bool:
        return ct.is_ct(quant_config) and ct.ct_kind(quant_config) != ct.FP8

    def validate(self, quant_config: dict[str, Any], where: str) -> None:
        why = ct.unsupported_reason(quant_config)
        if why is not None:
            raise MixedError(
                f"{where}: unsupported compressed-tensors checkpoint: {why}. vllm-mixed reads compressed-tensors "
                f"{ct.SUPPORTED}; route these layers to another source"
            )
        s = ct.scheme(quant_config, where)
        w, problems = s.weights, []
        if w.strategy not in ("group", "channel"):
            problems.append(f"weight strategy {w.strategy!r} (pack-quantized W4A16 is 'group' or 'channel')")
        if w.strategy == "group" and (not w.group_size or w.group_size <= 0 or w.group_size % PER_WORD):
            problems.append(f"group_size {w.group_size!r} (needs a positive multiple of 8, e.g. 128)")
        if w.dynamic:
            problems.append("dynamic weights")
        if w.actorder in ("group", "dynamic"):
            problems.append(
                f"actorder {w.actorder!r} (stores weight_g_idx; vLLM no longer reads it: use a checkpoint without "
                "activation ordering, or actorder 'weight')"
            )
        if quant_config.get("kv_cache_scheme"):
            problems.append("kv_cache_scheme (kv-cache quantization is not read by vllm-mixed)")
        if problems:
            raise MixedError(f"{where}: unsupported compressed-tensors W4A16 checkpoint: " + "; ".join(problems))

    def converts(self, quant_config: dict[str, Any] | None, layer: Layer, where: str) -> bool:
        return ct.layer_converted(quant_config, layer, where)

    # --- tensors -------------------------------------------------------------------------------------------------
    def precision(self, quant_config: dict[str, Any] | None, dtype: str = "bfloat16") -> str:
        s = ct.scheme(quant_config)
        label = f"int4-g{s.group}" if s.group != -1 else "int4-ch"
        return label + ("" if s.weights.symmetric else "-asym")

    def specs(self, out_features: int, in_features: int, quant_config: dict[str, Any] | None) -> dict[str, TensorSpec]:
        n, k = out_features, in_features
        g = _group(quant_config, k)
        if k % g or k % PER_WORD:
            raise MixedError(
                f"compressed-tensors W4A16 group_size {g} does not divide a linear's in_features {k} (weight "
                f"[{n}, {k}]): vLLM's CompressedTensorsWNA16 allocates in // group scale columns and its kernels "
                "need whole groups; use a checkpoint quantized with a group size that divides every input size"
            )
        out = {
            "weight_packed": TensorSpec(("I32",), (n, k // PER_WORD)),
            "weight_scale": TensorSpec(SCALE_DTYPES, (n, k // g)),
            "weight_shape": TensorSpec(("I64", "I32"), (2,)),
        }
        if not _symmetric(quant_config):
            out["weight_zero_point"] = TensorSpec(("I32",), (-(-n // PER_WORD), k // g))
        return out

    def runtime_dtype(self, suffix: str, model_dtype: torch.dtype) -> torch.dtype | None:
        return model_dtype if suffix == "weight_scale" else None  # vLLM allocates the scales in params_dtype

    def quantize(
        self, weight: torch.Tensor, quant_config: dict[str, Any] | None, scale_dtype: str = "bfloat16", **_: Any
    ) -> dict[str, torch.Tensor]:
        """Round-to-nearest with min-max scales as llm-compressor's observer
        computes them (symmetric: amax / 7.5, zero point 0; asymmetric:
        (max - min) / 15 with a rounded zero point); the scale is rounded to
        ``scale_dtype`` first so the stored tensors decode exactly to what
        :meth:`dequantize` computes."""
        n, k = weight.shape
        g = _group(quant_config, k)
        if k % g or k % PER_WORD or n % PER_WORD:
            raise ValueError(f"W4A16 needs in_features % group == 0 and dims % 8 == 0, got [{n}, {k}] group {g}")
        w = weight.to(torch.float64).reshape(n, k // g, g)
        dtype = _TORCH_SCALE[scale_dtype]
        if _symmetric(quant_config):
            scale = _scale_up(w.abs().amax(dim=2) / 7.5, dtype)
            zero = torch.zeros(n, k // g, dtype=torch.int64)
        else:
            lo, hi = w.amin(dim=2).clamp(max=0), w.amax(dim=2).clamp(min=0)
            scale = _scale_up((hi - lo) / (QMAX - QMIN), dtype)
            zero = torch.round(QMIN - lo / scale.to(torch.float64)).clamp(QMIN, QMAX).to(torch.int64)
        q = torch.round(w / scale.to(torch.float64).unsqueeze(2)) + zero.unsqueeze(2)
        q = q.clamp(QMIN, QMAX).to(torch.int64).reshape(n, k)
        out = {
            "weight_packed": pack_int4(q + OFFSET, dim=1),
            "weight_scale": scale.contiguous(),
            "weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if not _symmetric(quant_config):
            out["weight_zero_point"] = pack_int4(zero + OFFSET, dim=0)
        return out

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Also for stacked experts ([E, N, K/8] ...): every op works on the last two dims."""
        q = unpack_int4(tensors["weight_packed"], dim=-1) - OFFSET  # [..., N, K]
        scale = tensors["weight_scale"]
        g = q.shape[-1] // scale.shape[-1]
        full = scale.to(dtype).repeat_interleave(g, dim=-1)
        if "weight_zero_point" in tensors:
            zero = unpack_int4(tensors["weight_zero_point"], dim=-2)[..., : q.shape[-2], :] - OFFSET
            q = q - zero.repeat_interleave(g, dim=-1)
        return q.to(dtype) * full

    def dequantize_experts(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        out = torch.empty(*tensors["weight_packed"].shape[:-1], tensors["weight_packed"].shape[-1] * PER_WORD,
                          dtype=out_dtype)  # fmt: skip
        for lo in range(0, out.shape[0], 16):  # a few experts at a time: bounded float32 temporaries
            part = {s: t[lo : lo + 16] for s, t in tensors.items() if s != "weight_shape"}
            out[lo : lo + 16] = self.dequantize(part, quant_config, torch.float32).to(out_dtype)
        return out

    # --- vLLM ----------------------------------------------------------------------------------------------------
    def vllm_methods(self) -> tuple[str, str]:
        return "CompressedTensorsLinearMethod", "CompressedTensorsWNA16MoEMethod"

    def vllm_config(self, quant_config: dict[str, Any], quantized_modules: list[str]) -> Any:
        import copy

        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
            CompressedTensorsConfig,
        )

        return CompressedTensorsConfig.from_config(copy.deepcopy(quant_config))  # from_config edits its dict

    def int4_group_length(self, quant_config: dict[str, Any], k: int) -> int | None:
        return _group(quant_config, k)

    def cpu_kernel(self, kind: str, quant_config: dict[str, Any]) -> str | None:
        """The same vLLM checks as GPTQ int4 (``CompressedTensorsWNA16`` asks
        ``choose_mp_linear_kernel``; the MoE method the WNA16 oracle), with
        this checkpoint's group size and zero points."""
        s = ct.scheme(quant_config)
        return GPTQ_INT4.cpu_kernel(kind, {"group_size": s.group, "sym": s.weights.symmetric, "desc_act": False})

    def linear_params(
        self, k: int, parts: list[int], input_size: int, quant_config: dict[str, Any] | None
    ) -> dict[str, LinearParam]:
        """As CompressedTensorsWNA16.create_weights registers them: scales
        (and zero points) partitioned along the input unless the weight is
        channelwise and the layer row-parallel (marlin_repeat_scales_on_all_ranks:
        then every rank holds the one column)."""
        s = ct.scheme(quant_config)
        n, channel = sum(parts), s.group == -1
        g = input_size if channel else s.group
        partition = not (channel and input_size != k)
        groups = k // g if partition else input_size // g
        i32 = torch.int32
        out = {
            "weight_packed": LinearParam((n, k // PER_WORD), i32, "packed", 1, 0, packed_dim=1, packed_factor=PER_WORD),
            "weight_scale": LinearParam((n, groups), None, "group_scale" if partition else "channel_scale", 1, 0),
            "weight_shape": LinearParam((2,), torch.int64, "base", 0, 0),
        }  # fmt: skip
        if not s.weights.symmetric:
            out["weight_zero_point"] = LinearParam(
                (-(-n // PER_WORD), groups), i32, "packed" if partition else "packed_column", 1, 0,
                packed_dim=0, packed_factor=PER_WORD, fill=0,
            )  # fmt: skip
        return out

    def expert_params(
        self, experts: int, hidden: int, inter: int, w13_shards: int, quant_config: dict[str, Any] | None
    ) -> dict[str, dict[str, ExpertParam]]:
        """As CompressedTensorsWNA16MoEMethod registers them: N-first, not transposed."""
        s = ct.scheme(quant_config)
        channel = s.group == -1
        g13, g2 = (1, 1) if channel else (hidden // s.group, inter // s.group)
        attrs = {"quant_method": "channel" if channel else "group", "is_transposed": False}
        i32, n13 = torch.int32, w13_shards * inter
        out: dict[str, dict[str, ExpertParam]] = {
            "w13": {
                "weight_packed": ExpertParam((experts, n13, hidden // PER_WORD), i32, attrs),
                "weight_scale": ExpertParam((experts, n13, g13), None, attrs, 1.0),
                "weight_shape": ExpertParam((experts, 2), None, attrs),
            },
            "w2": {
                "weight_packed": ExpertParam((experts, hidden, inter // PER_WORD), i32, attrs),
                "weight_scale": ExpertParam((experts, hidden, g2), None, attrs, 1.0),
                "weight_shape": ExpertParam((experts, 2), None, attrs),
            },
        }
        if not s.weights.symmetric:
            out["w13"]["weight_zero_point"] = ExpertParam((experts, n13 // PER_WORD, g13), i32, attrs, 0)
            out["w2"]["weight_zero_point"] = ExpertParam((experts, hidden // PER_WORD, g2), i32, attrs, 0)
        return out

    # --- tensor-parallel rules -----------------------------------------------------------------------------------
    def linear_rule(
        self, shard: LinearShard, quant_config: dict[str, Any], dtype: str, capability: int
    ) -> tuple[str, str, str] | None:
        """CompressedTensorsWNA16.create_weights asks choose_mp_linear_kernel
        the same question as AutoGPTQLinearMethod (see gptq_int4.linear_rule:
        whole groups per rank, then Machete / Marlin / Exllama / Triton), with
        this checkpoint's group size; asymmetric weights are uint4 with zero
        points, which Machete and Exllama do not take here."""
        s = ct.scheme(quant_config)
        rule = GPTQ_INT4.linear_rule(shard, {"group_size": s.group, "desc_act": False}, dtype, capability)
        kernel, status, why = rule
        kernel = kernel.replace("AutoGPTQLinearMethod", "CompressedTensorsWNA16")
        return kernel, status, why.replace("AutoGPTQLinearMethod", "CompressedTensorsWNA16")

    def moe_rule(
        self, inter: int, geometry: Geometry, parallel: Parallel, quant_config: dict[str, Any]
    ) -> tuple[str, str, str]:
        """compressed_tensors_moe_wna16.py:CompressedTensorsWNA16MoEMethod.
        create_weights raises unless the group divides the hidden size and the
        per-rank intermediate size; the WNA16 oracle then prefers Marlin MoE
        (marlin_utils.check_moe_marlin_supports_config: group -1/32/64/128,
        hidden % 128, tile padding allowed), else another WNA16 backend."""
        s = ct.scheme(quant_config)
        g, method = s.group, "CompressedTensorsWNA16MoEMethod"
        if g != -1 and (geometry.hidden % g or inter % g):
            why = (
                f"intermediate_size_per_partition {inter} or hidden_size {geometry.hidden} is not a multiple of "
                f"group_size {g} (CompressedTensorsWNA16MoEMethod.create_weights raises)"
            )
            return method, FAILS, why
        if g in (-1, 32, 64, 128) and geometry.hidden % 128 == 0:
            return f"{method}: Marlin MoE", OK, ""
        return f"{method}: Triton WNA16", FALLBACK, f"Marlin MoE does not take group {g} / hidden {geometry.hidden}"

    # --- export --------------------------------------------------------------------------------------------------
    def export_scheme(self, quant_config: dict[str, Any], where: str) -> ExportScheme:
        """The source's own weight arguments (pack-quantized W4A16)."""
        from compressed_tensors.quantization import QuantizationArgs

        s = ct.scheme(quant_config, where)
        w = s.weights
        args = QuantizationArgs(
            num_bits=4, type="int", strategy=w.strategy, group_size=w.group_size if w.strategy == "group" else None,
            symmetric=w.symmetric, dynamic=False,
        )  # fmt: skip
        return ExportScheme(self.name, args)

    def export_member(
        self, name: str, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, scheme: Any, where: str
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """compressed-tensors' own compressor re-packs the float64 decode with
        the source's scales and zero points; the result must equal the source
        tensors bit for bit (it is the source format already)."""
        from compressed_tensors.compressors import BaseCompressor

        state = {
            "weight": self.dequantize(tensors, quant_config, torch.float64),
            "weight_scale": tensors["weight_scale"],
        }
        if "weight_zero_point" in tensors:
            n = tensors["weight_packed"].shape[0]
            state["weight_zero_point"] = (unpack_int4(tensors["weight_zero_point"], dim=0)[:n] - OFFSET).to(torch.int8)
        out = BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme)
        same = all(torch.equal(out[s].to(t.dtype), t) for s, t in tensors.items() if s in out) and set(out) == set(
            tensors
        )
        return out, same


CT_W4A16 = CtW4A16()
