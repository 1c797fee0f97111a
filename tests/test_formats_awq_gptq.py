"""AWQ (GEMM, zero points), act-order GPTQ and 8-bit GPTQ: each writer/decoder
pair against an independent reference -- words packed by hand from the
documented layout, vLLM's own packing and AWQ-conversion helpers, a
per-element float64 decode written here -- plus detection, the fallback
parameters and the kernel rules."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.conftest import described
from tests.test_ct_vllm_params import SHAPES
from vllm_mixed.cli import main
from vllm_mixed.errors import MixedError
from vllm_mixed.formats import detect_format
from vllm_mixed.formats.awq import AWQ, AWQ_QUANT_CONFIG, awq_pack, awq_unpack
from vllm_mixed.formats.gptq_int4 import GPTQ_INT4, GPTQ_QUANT_CONFIG
from vllm_mixed.formats.gptq_int8 import GPTQ_INT8, GPTQ_INT8_QUANT_CONFIG
from vllm_mixed.formats.gptq_variants import GPTQ_ACT_ORDER_QUANT_CONFIG, GPTQ_CHANNELWISE_QUANT_CONFIG
from vllm_mixed.parallel import FAILS, OK, LinearShard


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return 0.02 * torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def by_hand_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g: int) -> torch.Tensor:
    """AutoAWQ's documented layout, one element at a time: nibble i of word
    c is column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; w = (q - z) * s."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    k, words = qweight.shape
    out = torch.empty(words * 8, k, dtype=torch.float64)
    for r in range(k):
        for c in range(words):
            wq, wz = int(qweight[r, c]) & 0xFFFFFFFF, int(qzeros[r // g, c]) & 0xFFFFFFFF
            for i in range(8):
                col = 8 * c + order[i]
                q, z = (wq >> 4 * i) & 15, (wz >> 4 * i) & 15
                out[col, r] = (q - z) * float(scales[r // g, col])
    return out


def test_awq_word_packed_by_hand() -> None:
    """Columns 0..7 holding the values 0..7 pack to nibbles 0,2,4,6,1,3,5,7."""
    assert int(awq_pack(torch.arange(8).view(1, 8))) & 0xFFFFFFFF == 0x75316420
    assert torch.equal(awq_unpack(torch.tensor([[0x75316420]], dtype=torch.int32)), torch.arange(8).view(1, 8))


@pytest.mark.parametrize("group", [32, 128])
def test_awq_writer_and_decoder_against_hand_decode(group: int) -> None:
    qc = {**AWQ_QUANT_CONFIG, "group_size": group}
    w = weight(16, 128)
    t = AWQ.quantize(w, qc)
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == {
        "qweight": ((128, 2), torch.int32), "qzeros": ((128 // group, 2), torch.int32),
        "scales": ((128 // group, 16), torch.float16),
    }  # fmt: skip
    ref = by_hand_awq(t["qweight"], t["qzeros"], t["scales"], group)
    assert torch.equal(AWQ.dequantize(t, qc), ref)
    # round to nearest with zero points: within half a step of the master weight
    step = t["scales"].to(torch.float64).repeat_interleave(group, 0).t()
    assert bool(((ref - w.double()).abs() <= step / 2 + 1e-12).all())


def test_awq_layout_is_vllms(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own AWQ packer writes our words; vLLM's AWQ-to-GPTQ conversion
    (what AutoAWQMarlinLinearMethod runs after loading) reads our codes."""
    from vllm.model_executor import parameter
    from vllm.model_executor.layers.quantization import auto_awq
    from vllm.model_executor.layers.quantization.utils import quant_utils as qu
    from vllm.scalar_type import scalar_types

    t = AWQ.quantize(weight(64, 256, 1), AWQ_QUANT_CONFIG)
    q, z = awq_unpack(t["qweight"]), awq_unpack(t["qzeros"])
    assert torch.equal(qu.awq_pack(q.to(torch.int32), 4, 256, 64), t["qweight"])
    layer = torch.nn.Module()
    layer.qweight = torch.nn.Parameter(t["qweight"].clone(), requires_grad=False)
    layer.qzeros = torch.nn.Parameter(t["qzeros"].clone(), requires_grad=False)
    with (
        mock.patch.object(parameter, "get_tensor_model_parallel_rank", return_value=0),
        mock.patch.object(parameter, "get_tensor_model_parallel_world_size", return_value=1),
    ):
        auto_awq._convert_awq_to_standard_format(layer, "qweight", "qzeros", 4)
    std_q = qu.unpack_quantized_values_into_int32(layer.qweight.data, scalar_types.uint4, 0)  # [K, N]
    std_z = qu.unpack_quantized_values_into_int32(layer.qzeros.data, scalar_types.uint4, 0)  # [N, G]
    assert torch.equal(std_q.to(torch.int64), q) and torch.equal(std_z.t().to(torch.int64), z)


def test_awq_experts_stack_decodes_per_expert() -> None:
    ts = [AWQ.quantize(weight(32, 128, e), AWQ_QUANT_CONFIG) for e in range(3)]
    stacked = {s: torch.stack([t[s] for t in ts]) for s in ts[0]}
    got = AWQ.dequantize_experts(stacked, AWQ_QUANT_CONFIG, torch.float32)
    for e, t in enumerate(ts):
        assert torch.equal(got[e], AWQ.dequantize(t, AWQ_QUANT_CONFIG).to(torch.float32))


def test_awq_export_keeps_codes_and_decompresses_to_reference() -> None:
    """Asymmetric pack-quantized: compressed-tensors' own decompression of
    the export equals the AWQ reference decode."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    t = AWQ.quantize(weight(64, 256, 2), AWQ_QUANT_CONFIG)
    scheme = QuantizationScheme(targets=["Linear"], weights=AWQ.export_scheme(AWQ_QUANT_CONFIG, "x").weights)
    scheme.format = infer_module_format(torch.nn.Linear, scheme).value
    out, exact = AWQ.export_member("m", t, AWQ_QUANT_CONFIG, scheme, "x")
    assert exact and scheme.format == "pack-quantized" and not scheme.weights.symmetric
    state = {**out, "weight_scale": out["weight_scale"].to(torch.float64)}  # decode in float64
    dense = BaseCompressor.get_value_from_registry(scheme.format).decompress(state, scheme)["weight"]
    assert torch.equal(dense.to(torch.float64), AWQ.dequantize(t, AWQ_QUANT_CONFIG))


def by_hand_gptq(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """GPTQ v1, one element at a time: value j of a qweight word at bits
    bits*j (along K), zero stored minus one, group of row k = g_idx[k]."""
    per, mask = 32 // bits, 2**bits - 1
    kw, n = t["qweight"].shape
    out = torch.empty(n, kw * per, dtype=torch.float64)
    for r in range(kw * per):
        grp = int(t["g_idx"][r])
        for c in range(n):
            q = (int(t["qweight"][r // per, c]) & 0xFFFFFFFF) >> bits * (r % per) & mask
            z = ((int(t["qzeros"][grp, c // per]) & 0xFFFFFFFF) >> bits * (c % per) & mask) + 1
            out[c, r] = (q - z) * float(t["scales"][grp, c])
    return out


def test_act_order_g_idx_is_a_real_permutation_and_decodes() -> None:
    qc = {**GPTQ_ACT_ORDER_QUANT_CONFIG, "group_size": 32}
    w = weight(16, 128, 3)
    t = GPTQ_INT4.quantize(w, qc)
    g_idx = t["g_idx"].to(torch.int64)
    assert not torch.equal(g_idx, torch.arange(128) // 32)  # not sequential groups
    assert torch.bincount(g_idx).tolist() == [32] * 4  # each group holds g columns
    ref = by_hand_gptq(t, 4)
    assert torch.equal(GPTQ_INT4.dequantize(t, qc), ref)
    step = t["scales"].to(torch.float64)[g_idx].t()  # [N, K]
    assert bool(((ref - w.double()).abs() <= step / 2 + 1e-12).all())
    # members of one fused layer (same input) share the order, as GPTQ's Hessian order does
    assert torch.equal(GPTQ_INT4.quantize(weight(8, 128, 4), qc)["g_idx"], t["g_idx"])


def test_channelwise_act_order_gptq_decodes_by_hand() -> None:
    """TheBloke's ``group_size: -1, desc_act: true``: one scale and zero point
    per output channel, g_idx all zero (one group has no column order), the
    per-element decode equal to the format's; within half a step of the
    weights; the plan's shapes say the same."""
    qc = GPTQ_CHANNELWISE_QUANT_CONFIG
    w = weight(16, 128, 6)
    t = GPTQ_INT4.quantize(w, qc)
    assert t["scales"].shape == (1, 16) and t["qzeros"].shape == (1, 2)
    assert not bool(t["g_idx"].any())
    ref = by_hand_gptq(t, 4)
    assert torch.equal(GPTQ_INT4.dequantize(t, qc), ref)
    assert torch.equal(GPTQ_INT4.dequantize({k: v for k, v in t.items() if k != "g_idx"}, qc), ref)
    assert bool(((ref - w.double()).abs() <= t["scales"].to(torch.float64).t() / 2 + 1e-12).all())
    specs = GPTQ_INT4.specs(16, 128, qc)
    assert {k: v.shape for k, v in specs.items()} == {k: tuple(v.shape) for k, v in t.items()}
    assert specs["g_idx"].optional  # vLLM reads it as desc_act false
    assert GPTQ_INT4.precision(qc) == "int4-channel"
    stacked = {
        s: torch.stack([t[s], GPTQ_INT4.quantize(weight(16, 128, 7), qc)[s]]) for s in ("qweight", "qzeros", "scales")
    }
    assert torch.equal(GPTQ_INT4.dequantize_experts(stacked, qc, torch.float32)[0], ref.to(torch.float32))


def test_gptq_int8_word_by_hand_and_vllms_packing() -> None:
    from vllm.model_executor.layers.quantization.utils import quant_utils as qu
    from vllm.scalar_type import scalar_types

    assert int(GPTQ_INT8.sym_zeros) == 0x7F7F7F7F
    t = GPTQ_INT8.quantize(weight(16, 128, 5), GPTQ_INT8_QUANT_CONFIG)
    assert t["qweight"].shape == (32, 16) and t["qzeros"].shape == (1, 4)
    assert bool((t["qzeros"] == 0x7F7F7F7F).all())
    q = qu.unpack_quantized_values_into_int32(t["qweight"], scalar_types.uint8b128, 0)
    assert torch.equal(qu.pack_rows(q, 8, 128, 16), t["qweight"])
    first = int(t["qweight"][0, 0]) & 0xFFFFFFFF
    assert [(first >> 8 * j) & 0xFF for j in range(4)] == q[:4, 0].tolist()  # lowest byte first along K
    ref = by_hand_gptq(t, 8)
    assert torch.equal(GPTQ_INT8.dequantize(t, GPTQ_INT8_QUANT_CONFIG), ref)
    # uint8b128: vLLM's reading is (q - 128) * scale
    assert torch.equal(((q.to(torch.float64) - 128) * t["scales"].to(torch.float64)[0]).t(), ref)


def test_gptq_int8_experts_stack() -> None:
    ts = [GPTQ_INT8.quantize(weight(32, 128, e), GPTQ_INT8_QUANT_CONFIG) for e in range(2)]
    stacked = {s: torch.stack([t[s] for t in ts]) for s in ("qweight", "qzeros", "scales")}
    got = GPTQ_INT8.dequantize_experts(stacked, GPTQ_INT8_QUANT_CONFIG, torch.float32)
    for e, t in enumerate(ts):
        assert torch.equal(got[e], GPTQ_INT8.dequantize(t, GPTQ_INT8_QUANT_CONFIG).to(torch.float32))


@pytest.mark.parametrize(
    "qc,name",
    [
        (AWQ_QUANT_CONFIG, "awq"),
        ({**AWQ_QUANT_CONFIG, "quant_method": "awq_marlin", "group_size": 64}, "awq"),
        (GPTQ_INT8_QUANT_CONFIG, "gptq_int8"),
        (GPTQ_ACT_ORDER_QUANT_CONFIG, "gptq_int4"),
        ({**GPTQ_INT8_QUANT_CONFIG, "desc_act": True}, "gptq_int8"),
    ],
)
def test_detection(qc: dict, name: str) -> None:
    assert detect_format(qc, "here") == name


@pytest.mark.parametrize(
    "qc,expected",
    [
        ({**AWQ_QUANT_CONFIG, "bits": 8}, "bits=8 (vLLM's AWQ kernels read 4-bit only)"),
        ({**AWQ_QUANT_CONFIG, "version": "gemv"}, "version='gemv' (only AutoAWQ's 'gemm' packing"),
        ({**AWQ_QUANT_CONFIG, "zero_point": False}, "zero_point=False"),
        ({**AWQ_QUANT_CONFIG, "group_size": 256}, "group_size=256 (vLLM's AWQ kernels take -1, 32, 64, 128"),
        ({**GPTQ_QUANT_CONFIG, "bits": 3}, "bits=3 (4 and 8 are supported"),
    ],
)
def test_detection_refuses(qc: dict, expected: str) -> None:
    with pytest.raises(MixedError) as exc:
        detect_format(qc, "source 'x' (/m) config.json")
    assert str(exc.value).startswith("source 'x' (/m) config.json: ") and expected in str(exc.value)


def test_specs_and_fallback_params() -> None:
    assert AWQ.specs(64, 256, AWQ_QUANT_CONFIG)["qweight"].shape == (256, 8)
    assert not GPTQ_INT4.specs(64, 256, GPTQ_ACT_ORDER_QUANT_CONFIG)["g_idx"].optional
    assert GPTQ_INT4.specs(64, 256, GPTQ_QUANT_CONFIG)["g_idx"].optional
    p = GPTQ_INT4.linear_params(128, [64], 256, GPTQ_ACT_ORDER_QUANT_CONFIG)  # a row-parallel rank of TP 2
    assert (p["g_idx"].kind, p["g_idx"].shape) == ("row", (128,))
    assert (p["scales"].kind, p["scales"].shape) == ("channel_scale", (2, 64))  # every group on every rank
    assert GPTQ_INT8.linear_params(128, [64], 128, GPTQ_INT8_QUANT_CONFIG)["qweight"].shape == (32, 64)
    experts = GPTQ_INT4.expert_params(4, 128, 64, 2, GPTQ_ACT_ORDER_QUANT_CONFIG)
    assert (experts["w13"]["g_idx"].shape, experts["w2"]["g_idx"].shape) == ((4, 128), (4, 64))
    assert experts["w13"]["g_idx"].attrs == {"own_loader": "g_idx"} and experts["w13"]["g_idx"].fill == -1
    assert "g_idx" not in GPTQ_INT4.expert_params(4, 128, 64, 2, GPTQ_QUANT_CONFIG)["w13"]


def test_act_order_experts_decode_as_their_members() -> None:
    """The fallback's stacked act-order decode (each expert with its own
    g_idx, gate and up side by side as vLLM's loader stacks them) equals
    the per-member reference decode, at g32 (8 groups)."""
    qc = {**GPTQ_ACT_ORDER_QUANT_CONFIG, "group_size": 32}
    gen = torch.Generator().manual_seed(3)
    stacks: dict[str, list[torch.Tensor]] = {"qweight": [], "qzeros": [], "scales": [], "g_idx": []}
    expected = []
    for _ in range(3):
        gate, up = torch.randn(2, 48, 256, generator=gen, dtype=torch.float64)
        t_gate = GPTQ_INT4.quantize(gate, qc)
        t_up = GPTQ_INT4.quantize(up, qc)
        assert torch.equal(t_gate["g_idx"], t_up["g_idx"])  # one input, one column order
        for k in ("qweight", "qzeros", "scales"):
            stacks[k].append(torch.cat([t_gate[k], t_up[k]], dim=1))
        stacks["g_idx"].append(t_gate["g_idx"])
        expected.append(torch.cat([GPTQ_INT4.dequantize(t_gate, qc), GPTQ_INT4.dequantize(t_up, qc)]))
    got = GPTQ_INT4.dequantize_experts({k: torch.stack(v) for k, v in stacks.items()}, qc, torch.float64)
    assert torch.allclose(got, torch.stack(expected), atol=1e-6)
    wrong = {k: torch.stack(v) for k, v in stacks.items()} | {"g_idx": torch.arange(256).repeat(3, 1) // 32}
    assert not torch.allclose(GPTQ_INT4.dequantize_experts(wrong, qc, torch.float64), torch.stack(expected), atol=1e-3)


def test_shape_hint_names_gptq_layout() -> None:
    spec = AWQ.specs(64, 256, AWQ_QUANT_CONFIG)["qweight"]
    assert "GPTQ's layout [in/8, out]" in AWQ.shape_hint("qweight", (32, 64), spec, AWQ_QUANT_CONFIG)


def test_kernel_rules() -> None:
    shard = LinearShard(k=192, k_full=384, parts=(1024,), row_split=True, col_split=False)
    assert AWQ.linear_rule(shard, AWQ_QUANT_CONFIG, "bfloat16", 90)[1] == FAILS  # a group straddles ranks
    whole = LinearShard(k=256, k_full=512, parts=(1024,), row_split=True, col_split=False)
    assert AWQ.linear_rule(whole, AWQ_QUANT_CONFIG, "bfloat16", 90)[:2] == ("AutoAWQMarlinLinearMethod: Marlin", OK)
    # 8-bit: no Triton W4A16; act-order experts have no MoE-WNA16 fallback
    assert GPTQ_INT8.linear_rule(whole, GPTQ_INT8_QUANT_CONFIG, "bfloat16", 90)[1] == OK
    from vllm_mixed.formats.gptq_rules import gptq_moe_rule

    assert gptq_moe_rule(96, 2048, 128, act_order=True)[1] == FAILS


def test_make_tiny_writes_the_published_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``make-tiny --formats awq,gptq-int8`` writes both directories, each
    detected as its format from its own config.json, and ``plan`` reads them."""
    import json

    assert main(["make-tiny", str(tmp_path / "t"), "--arch", "llama", "--formats", "bf16,awq,gptq-int8"]) == 0
    for directory, fmt in (("awq", "awq"), ("gptq-int8", "gptq_int8")):
        qc = json.loads((tmp_path / "t" / directory / "config.json").read_text())["quantization_config"]
        assert detect_format(qc, directory) == fmt
    assert json.loads((tmp_path / "t" / "awq" / "config.json").read_text())["quantization_config"] == AWQ_QUANT_CONFIG
    capsys.readouterr()
    recipe = tmp_path / "t" / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("default: bf16", "default: awq"))
    assert main(["plan", str(recipe)]) == 0
    assert "awq-int4-g128" in capsys.readouterr().out


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("qc", [GPTQ_QUANT_CONFIG, GPTQ_CHANNELWISE_QUANT_CONFIG], ids=["g128", "channelwise"])
def test_gptq_fallback_registers_vllms_parameters(one_rank, qc: dict, shape: str) -> None:
    """The fallback registers what vLLM's AutoGPTQLinearMethod registers: a
    channelwise row-parallel shard keeps its one group of scales and zeros on
    every rank (marlin_repeat_scales_on_all_ranks), not a share of them."""
    import copy

    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig, AutoGPTQLinearMethod

    from vllm_mixed.methods.dequant_fallback import DequantFallbackLinearMethod

    k, parts, input_size = SHAPES[shape]
    theirs = torch.nn.Module()
    theirs.tp_size = 1
    AutoGPTQLinearMethod(AutoGPTQConfig.from_config(copy.deepcopy(qc))).create_weights(
        layer=theirs, input_size_per_partition=k, output_partition_sizes=parts, input_size=input_size,
        output_size=sum(parts), params_dtype=torch.bfloat16, weight_loader=None,
    )  # fmt: skip
    ours = torch.nn.Module()
    DequantFallbackLinearMethod(GPTQ_INT4, qc).create_weights(ours, k, parts, input_size, sum(parts), torch.bfloat16)
    assert described(ours) == described(theirs)
