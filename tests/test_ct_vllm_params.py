"""The CPU fallback registers, for each compressed-tensors scheme, exactly
the parameters vLLM's own scheme registers (names, vLLM parameter classes,
shapes, dtypes, sharding dims): vLLM's ``CompressedTensorsWNA16`` /
``CompressedTensorsW8A8Fp8`` ``create_weights`` on a bare module, tensor
parallel patched to one rank, against ``DequantFallbackLinearMethod``."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import described
from vllm_mixed.formats.ct_fp8 import CT_FP8, fp8_config
from vllm_mixed.formats.ct_w4a16 import CT_W4A16, w4a16_config

CONFIGS = {
    "w4a16-g128": (CT_W4A16, w4a16_config(128)),
    "w4a16-g64-asym": (CT_W4A16, w4a16_config(64, False)),
    "w4a16-channel-asym": (CT_W4A16, w4a16_config(None, False)),
    "fp8-channel": (CT_FP8, fp8_config()),
    "fp8-tensor-static": (CT_FP8, fp8_config("tensor", "static")),
    "fp8-block": (CT_FP8, fp8_config("block")),
}
# (input per rank, output parts, full input): a fused column layer, a row-parallel shard
SHAPES = {"qkv": (256, [512, 128, 128], 256), "row-shard": (256, [256], 512)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fallback_registers_vllms_parameters(one_rank, name: str, shape: str) -> None:
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    from vllm_mixed.methods.dequant_fallback import DequantFallbackLinearMethod

    fmt, qc = CONFIGS[name]
    k, parts, input_size = SHAPES[shape]
    vllm_config = CompressedTensorsConfig.from_config(copy.deepcopy(qc))
    args = vllm_config.target_scheme_map["Linear"]
    scheme = vllm_config._get_scheme_from_parts(args["weights"], args["input_activations"], format=qc["format"])
    sizes = dict(output_size=sum(parts), input_size=input_size, output_partition_sizes=parts,
                 input_size_per_partition=k, params_dtype=torch.bfloat16)  # fmt: skip
    theirs = torch.nn.Module()
    theirs.tp_size = 1
    try:
        scheme.create_weights(layer=theirs, weight_loader=None, **sizes)
    except ValueError as exc:  # no kernel on this CPU (block FP8 without AMX): raised after the parameters exist
        assert "Failed to find a kernel" in str(exc)
    ours = torch.nn.Module()
    DequantFallbackLinearMethod(fmt, qc).create_weights(ours, k, parts, input_size, sum(parts), torch.bfloat16)
    assert described(ours) == described(theirs)
