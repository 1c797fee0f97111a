"""Formats: int4 packing, GPTQ and FP8 block quantize/dequantize against a
float64 reference, on fresh random data every run (no fixed seed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vllm_mixed.formats import FORMATS
from vllm_mixed.formats.fp8_block import FP8_BLOCK, expand_block_scale
from vllm_mixed.formats.gptq_int4 import GPTQ_INT4, dequantize_stacked, pack_int4, unpack_int4
from vllm_mixed.formats.unquantized import UNQUANTIZED
from vllm_mixed.safetensors_header import DTYPE_SIZES

SAFETENSORS_DTYPE = {
    torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.float32: "F32", torch.int32: "I32",
}  # fmt: skip
SYM_QZERO = 0x77777777  # zero point 8, stored minus one, in every nibble


def random_weight(out_features: int, in_features: int) -> torch.Tensor:
    """Normal weights whose magnitude varies by orders of magnitude across
    rows and columns (so scales differ between groups and blocks); never zero."""
    w = torch.randn(out_features, in_features, dtype=torch.float64)
    w *= 10.0 ** torch.empty(out_features, 1, dtype=torch.float64).uniform_(-3, 1)
    w *= 10.0 ** torch.empty(1, in_features, dtype=torch.float64).uniform_(-1, 1)
    assert (w != 0).any()
    return w


# --- int4 packing ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dim", [((64, 24), 0), ((24, 64), 1), ((3, 16, 5), 1), ((8,), 0)])
def test_pack_unpack_exact_inverse(shape: tuple[int, ...], dim: int) -> None:
    values = torch.randint(0, 16, shape)
    words = pack_int4(values, dim)
    assert words.dtype == torch.int32
    expected = list(shape)
    expected[dim] //= 8
    assert list(words.shape) == expected
    assert torch.equal(unpack_int4(words, dim), values)


def test_unpack_pack_exact_inverse_on_any_words() -> None:
    words = torch.randint(-(2**31), 2**31, (16, 24), dtype=torch.int64).to(torch.int32)
    words[0, :3] = torch.tensor([-1, -(2**31), 2**31 - 1], dtype=torch.int32)
    for dim in (0, 1):
        values = unpack_int4(words, dim)
        assert int(values.min()) >= 0 and int(values.max()) <= 15
        assert torch.equal(pack_int4(values, dim), words)


def test_pack_layout_lowest_nibble_first() -> None:
    """Word i along ``dim`` holds values 8i..8i+7, value j in bits 4j..4j+3."""
    values = np.random.randint(0, 16, size=(40, 6)).astype(np.uint64)
    words = np.zeros((5, 6), dtype=np.uint64)
    for j in range(8):
        words |= values[j::8] << np.uint64(4 * j)
    expected = words.astype(np.uint32).view(np.int32)
    got = pack_int4(torch.from_numpy(values.astype(np.int64)), dim=0).numpy()
    assert np.array_equal(got, expected)
    assert np.array_equal(pack_int4(torch.from_numpy(values.T.astype(np.int64)), dim=1).numpy(), expected.T)


@pytest.mark.parametrize("bad", [16, -1])
def test_pack_refuses_out_of_range(bad: int) -> None:
    values = torch.randint(0, 16, (8, 4))
    values[3, 2] = bad
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(values, 0)


def test_pack_refuses_partial_word() -> None:
    with pytest.raises(ValueError, match="cannot pack 12 values eight to a word"):
        pack_int4(torch.zeros(12, 8, dtype=torch.int64), 0)


# --- GPTQ int4 ----------------------------------------------------------------------------------


def group_scales(tensors: dict[str, torch.Tensor], in_features: int, group: int) -> torch.Tensor:
    """[out, in] float64 scale of each weight element."""
    return tensors["scales"].to(torch.float64)[torch.arange(in_features) // group].t()


def check_gptq_specs(tensors: dict[str, torch.Tensor], n: int, k: int, qc: dict) -> None:
    specs = GPTQ_INT4.specs(n, k, qc)
    assert set(tensors) == set(specs)
    for suffix, spec in specs.items():
        t = tensors[suffix]
        assert tuple(t.shape) == spec.shape, suffix
        assert SAFETENSORS_DTYPE[t.dtype] == spec.dtypes[0], suffix


@pytest.mark.parametrize("n,k,group", [(256, 512, 128), (64, 256, 32), (128, 384, 64), (16, 128, 128)])
def test_gptq_sym_error_at_most_half_step(n: int, k: int, group: int) -> None:
    qc = {"bits": 4, "group_size": group, "sym": True}
    w = random_weight(n, k)
    tensors = GPTQ_INT4.quantize(w, qc)
    check_gptq_specs(tensors, n, k, qc)
    scale = group_scales(tensors, k, group)
    assert (scale > 0).all()
    err = (GPTQ_INT4.dequantize(tensors, qc) - w).abs()
    assert (err <= scale / 2 * (1 + 1e-12)).all(), float((err / scale).max())
    # the scale is no bigger than needed: the group's largest weight uses the top step
    amax = w.abs().t().reshape(k // group, group, n).amax(dim=1)
    assert torch.allclose(tensors["scales"].to(torch.float64), 2 * amax / 15, rtol=2**-10)
    assert torch.equal(tensors["g_idx"], (torch.arange(k) // group).to(torch.int32))


def test_gptq_sym_qzeros_are_all_0x77777777() -> None:
    w = random_weight(128, 256)
    qzeros = GPTQ_INT4.quantize(w, {"group_size": 64, "sym": True})["qzeros"]
    assert qzeros.dtype == torch.int32 and tuple(qzeros.shape) == (4, 16)
    assert SYM_QZERO == 2004318071
    assert (qzeros == SYM_QZERO).all()
    # the default (no config) is symmetric g128
    assert (GPTQ_INT4.quantize(w, None)["qzeros"] == SYM_QZERO).all()


@pytest.mark.parametrize("n,k,group", [(256, 512, 128), (64, 256, 32)])
def test_gptq_asym_error_at_most_half_step(n: int, k: int, group: int) -> None:
    qc = {"bits": 4, "group_size": group, "sym": False}
    w = random_weight(n, k)
    w[:, :group] = w[:, :group].abs()  # a group of only positive weights
    w[:, group : 2 * group] = -w[:, group : 2 * group].abs()  # and one of only negative ones
    w[: n // 2, -group:] += 3 * w[: n // 2, -group:].abs().amax(dim=1, keepdim=True)  # shifted far from zero
    tensors = GPTQ_INT4.quantize(w, qc)
    check_gptq_specs(tensors, n, k, qc)
    scale = group_scales(tensors, k, group)
    err = (GPTQ_INT4.dequantize(tensors, qc) - w).abs()
    assert (err <= scale / 2 * (1 + 1e-12)).all(), float((err / scale).max())
    zeros = unpack_int4(tensors["qzeros"], dim=1) + 1
    assert int(zeros.min()) >= 1 and int(zeros.max()) <= 15
    assert len(torch.unique(zeros)) > 2  # really asymmetric, not all 8


def test_gptq_all_zero_weights_stay_zero() -> None:
    w = torch.zeros(32, 256, dtype=torch.float64)
    w[:, 128:] = random_weight(32, 128)
    for sym in (True, False):
        tensors = GPTQ_INT4.quantize(w, {"group_size": 128, "sym": sym})
        assert torch.isfinite(tensors["scales"]).all() and (tensors["scales"] > 0).all()
        deq = GPTQ_INT4.dequantize(tensors, None)
        assert torch.equal(deq[:, :128], w[:, :128])


def test_gptq_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="in_features % 128"):
        GPTQ_INT4.quantize(torch.randn(16, 200), {"group_size": 128})
    with pytest.raises(ValueError, match="dims % 8"):
        GPTQ_INT4.quantize(torch.randn(12, 128), {"group_size": 128})


def reference_gptq_dequant(tensors: dict[str, torch.Tensor], group: int) -> np.ndarray:
    """GPTQ v1 decoding written out with numpy bit operations."""
    qweight = tensors["qweight"].numpy().view(np.uint32)  # [K/8, N]
    qzeros = tensors["qzeros"].numpy().view(np.uint32)  # [G, N/8]
    scales = tensors["scales"].numpy().astype(np.float64)  # [G, N]
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    g_idx = tensors["g_idx"].numpy() if "g_idx" in tensors else np.arange(k) // group
    out = np.empty((n, k), dtype=np.float64)
    cols = np.arange(n)
    zero = ((qzeros[:, cols // 8] >> (4 * (cols % 8)).astype(np.uint32)) & 0xF).astype(np.int64) + 1  # [G, N]
    for kk in range(k):
        q = ((qweight[kk // 8] >> np.uint32(4 * (kk % 8))) & 0xF).astype(np.int64)  # [N]
        grp = g_idx[kk]
        out[:, kk] = (q - zero[grp]).astype(np.float64) * scales[grp]
    return out


@pytest.mark.parametrize("with_g_idx", ["ordered", "shuffled", "absent"])
def test_gptq_dequantize_is_exact(with_g_idx: str) -> None:
    n, k, group = 64, 256, 64
    groups = k // group
    tensors = {
        "qweight": torch.randint(-(2**31), 2**31, (k // 8, n), dtype=torch.int64).to(torch.int32),
        "qzeros": torch.randint(-(2**31), 2**31, (groups, n // 8), dtype=torch.int64).to(torch.int32),
        "scales": (torch.rand(groups, n) * 0.1 + 1e-3).to(torch.float16),
        "g_idx": (torch.arange(k) // group).to(torch.int32),
    }
    if with_g_idx == "shuffled":
        tensors["g_idx"] = tensors["g_idx"][torch.randperm(k)]
    elif with_g_idx == "absent":
        del tensors["g_idx"]
    got = GPTQ_INT4.dequantize(tensors, {"group_size": group}, dtype=torch.float64)
    assert got.dtype == torch.float64 and tuple(got.shape) == (n, k)
    assert np.array_equal(got.numpy(), reference_gptq_dequant(tensors, group))


def test_gptq_quantized_tensors_decode_with_reference() -> None:
    w = random_weight(64, 256)
    tensors = GPTQ_INT4.quantize(w, {"group_size": 128, "sym": False})
    assert np.array_equal(GPTQ_INT4.dequantize(tensors, None).numpy(), reference_gptq_dequant(tensors, 128))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 96])
def test_gptq_stacked_dequant_equals_per_expert_reference(sym: bool, group: int) -> None:
    """The CPU path's batched expert dequantizer (int32 unpack, chunked, in
    vLLM's transposed [E, K/8, N] layout) against the per-matrix reference,
    with every nibble value and sign-bit words present."""
    gen = torch.Generator().manual_seed(3)
    qc = {"group_size": group, "sym": sym, "desc_act": False}
    experts, n, k = 5, 48, 96
    enc = [GPTQ_INT4.quantize(torch.randn(n, k, generator=gen), qc) for _ in range(experts)]
    stack = {name: torch.stack([e[name] for e in enc]) for name in ("qweight", "qzeros", "scales")}
    assert (stack["qweight"] < 0).any(), "words with the sign bit set must be covered"
    got = dequantize_stacked(
        stack["qweight"], stack["qzeros"], stack["scales"], group, torch.float64, torch.float64, chunk=2
    )
    want = torch.stack([GPTQ_INT4.dequantize(e, qc, torch.float64) for e in enc])
    assert got.shape == (experts, n, k)
    assert torch.equal(got, want)


def test_gptq_packing_matches_vllm_helpers() -> None:
    """Our layout is the one vLLM's own reference helpers write and read."""
    import importlib

    qu = importlib.import_module("vllm.model_executor.layers.quantization.utils.quant_utils")
    k, n, group = 256, 64, 64
    q = torch.randint(0, 16, (k, n), dtype=torch.int32)
    z = torch.randint(0, 16, (k // group, n), dtype=torch.int32)

    pack_rows = getattr(qu, "gptq_pack", None) or getattr(qu, "pack_rows", None)
    if pack_rows is None:
        pytest.skip("this vLLM has neither gptq_pack nor pack_rows")
    assert torch.equal(pack_rows(q, 4, k, n), pack_int4(q, dim=0))
    if hasattr(qu, "pack_rows"):
        assert torch.equal(qu.pack_rows(q, 4, k, n), pack_int4(q, dim=0))
    if hasattr(qu, "pack_cols"):
        assert torch.equal(qu.pack_cols(z, 4, k // group, n), pack_int4(z, dim=1))
    if hasattr(qu, "unpack_cols"):
        assert torch.equal(qu.unpack_cols(pack_int4(z, dim=1), 4, k // group, n).to(torch.int64), z.to(torch.int64))

    # vLLM reads symmetric GPTQ as uint4b8: weight = (q - 8) * scale, qzeros ignored
    unpack = getattr(qu, "unpack_quantized_values_into_int32", None)
    if unpack is not None:
        from vllm.scalar_type import scalar_types

        wtype = scalar_types.uint4b8
        w = random_weight(n, k)
        tensors = GPTQ_INT4.quantize(w, {"group_size": group, "sym": True})
        vq = unpack(tensors["qweight"], wtype, packed_dim=0).to(torch.int64)  # [K, N]
        assert torch.equal(vq, unpack_int4(tensors["qweight"], dim=0))
        scales = tensors["scales"].to(torch.float64)[tensors["g_idx"].long()]
        vllm_weight = ((vq - wtype.bias).to(torch.float64) * scales).t()
        assert torch.equal(vllm_weight, GPTQ_INT4.dequantize(tensors, None))
        assert torch.equal(
            qu.pack_quantized_values_into_int32(vq.to(torch.int32), wtype, packed_dim=0), tensors["qweight"]
        )


# --- FP8 block ---------------------------------------------------------------------------------

FP8_MIN_SUBNORMAL = 2.0**-9


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (1, 129), (128, 128), (130, 7)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_fp8_round_trip_error_bounded(shape: tuple[int, int], scale_dtype: torch.dtype) -> None:
    qc = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    w = random_weight(*shape)
    tensors = FP8_BLOCK.quantize(w, qc, scale_dtype=scale_dtype)
    specs = FP8_BLOCK.specs(*shape, qc)
    assert set(tensors) == set(specs)
    for suffix, spec in specs.items():
        assert tuple(tensors[suffix].shape) == spec.shape
        assert SAFETENSORS_DTYPE[tensors[suffix].dtype] in spec.dtypes
    assert tensors["weight"].dtype == torch.float8_e4m3fn
    assert tensors["weight_scale_inv"].dtype == scale_dtype
    assert tuple(tensors["weight_scale_inv"].shape) == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))

    scale = expand_block_scale(tensors["weight_scale_inv"].to(torch.float64), *shape, (128, 128))
    err = (FP8_BLOCK.dequantize(tensors, qc) - w).abs()
    # e4m3 has 3 mantissa bits: half an ulp is 2^-4 relative; below the normal range, half a subnormal step
    bound = 2.0**-4 * w.abs() * (1 + 2**-10) + FP8_MIN_SUBNORMAL * scale
    assert (err <= bound).all(), float((err / bound).max())
    # each block uses the fp8 range: its largest weight lands near 448
    q = tensors["weight"].to(torch.float64).abs()
    for i in range(0, shape[0], 128):
        for j in range(0, shape[1], 128):
            assert q[i : i + 128, j : j + 128].max() >= 416


def test_fp8_zero_block_stays_zero() -> None:
    w = random_weight(256, 256)
    w[:128, 128:] = 0
    tensors = FP8_BLOCK.quantize(w, None)
    assert (tensors["weight_scale_inv"].to(torch.float32) > 0).all()
    assert torch.equal(FP8_BLOCK.dequantize(tensors, None)[:128, 128:], w[:128, 128:])


def decode_e4m3(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes to float64, from the bit layout (bias 7, no inf)."""
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp = ((bits >> 3) & 0xF).astype(np.int64)
    man = (bits & 0x7).astype(np.float64)
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))
    return sign * value


@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((256, 384), (128, 128)), ((100, 70), (64, 32))])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_fp8_dequantize_is_exact(shape: tuple[int, int], block: tuple[int, int], scale_dtype: torch.dtype) -> None:
    rows, cols = math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])
    bits = torch.randint(0, 256, shape, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x11  # no NaN patterns
    tensors = {
        "weight": bits.view(torch.float8_e4m3fn),
        "weight_scale_inv": (torch.rand(rows, cols) * 2 + 1e-3).to(scale_dtype),
    }
    got = FP8_BLOCK.dequantize(tensors, {"weight_block_size": list(block)}, dtype=torch.float64).numpy()

    w = decode_e4m3(bits.numpy())
    s = tensors["weight_scale_inv"].to(torch.float64).numpy()
    expected = np.empty(shape, dtype=np.float64)
    for i in range(rows):
        for j in range(cols):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            expected[r, c] = w[r, c] * s[i, j]
    assert np.array_equal(got, expected)
    # and with kron, cropped
    kron = np.kron(s, np.ones(block))[: shape[0], : shape[1]]
    assert np.array_equal(got, w * kron)


def test_fp8_block_size_from_config() -> None:
    qc = {"weight_block_size": [64, 32]}
    w = random_weight(100, 70)
    tensors = FP8_BLOCK.quantize(w, qc)
    assert tuple(tensors["weight_scale_inv"].shape) == (2, 3)
    assert FP8_BLOCK.precision(qc) == "fp8-block64x32"
    assert FP8_BLOCK.specs(100, 70, qc)["weight_scale_inv"].shape == (2, 3)


# --- unquantized and the table ---------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,torch_dtype,mantissa", [("bfloat16", torch.bfloat16, 7), ("float16", torch.float16, 10)]
)
def test_unquantized_round_trip(dtype: str, torch_dtype: torch.dtype, mantissa: int) -> None:
    w = torch.randn(48, 80, dtype=torch.float64)
    tensors = UNQUANTIZED.quantize(w, None, dtype)
    assert tensors["weight"].dtype == torch_dtype
    got = UNQUANTIZED.dequantize(tensors, None)
    assert torch.equal(got, tensors["weight"].to(torch.float64))
    half_subnormal_step = torch.finfo(torch_dtype).tiny * 2.0 ** -(mantissa + 1)
    assert ((got - w).abs() <= 2.0 ** -(mantissa + 1) * w.abs() + half_subnormal_step).all()


def test_formats_table() -> None:
    from vllm_mixed.formats.ct_fp8 import CT_FP8_QUANT_CONFIG
    from vllm_mixed.formats.ct_w4a16 import CT_W4A16_QUANT_CONFIG

    assert set(FORMATS) == {"unquantized", "fp8_block", "gptq_int4", "gptq_int8", "awq", "ct_w4a16", "ct_fp8"}
    configs = {"ct_w4a16": CT_W4A16_QUANT_CONFIG, "ct_fp8": CT_FP8_QUANT_CONFIG}
    for name, fmt in FORMATS.items():
        assert fmt.name == name
        qc = configs.get(name, {"group_size": 128, "weight_block_size": [128, 128]})
        for spec in fmt.specs(256, 512, qc).values():
            assert set(spec.dtypes) <= set(DTYPE_SIZES)
    assert GPTQ_INT4.precision({"group_size": 64}) == "int4-g64"


# --- compressed-tensors sources, against compressed-tensors' own decompressors ----------------------------------

from vllm_mixed.formats import ct_common  # noqa: E402
from vllm_mixed.formats.ct_fp8 import CT_FP8, fp8_config  # noqa: E402
from vllm_mixed.formats.ct_w4a16 import CT_W4A16, w4a16_config  # noqa: E402


def _ct_decompress(tensors: dict[str, torch.Tensor], quant_config: dict) -> torch.Tensor:
    """compressed-tensors' own decompression of one module's tensors (the
    independent reference): its compressor for the config group's format."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    group = quant_config["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                input_activations=group.get("input_activations"))  # fmt: skip
    compressor = BaseCompressor.get_value_from_registry(quant_config["format"])
    return compressor.decompress(dict(tensors), scheme)["weight"]


W4A16_CASES = [(128, True), (32, True), (None, True), (128, False), (64, False), (None, False)]


@pytest.mark.parametrize("group,symmetric", W4A16_CASES)
def test_ct_w4a16_decode_equals_compressed_tensors(group: int | None, symmetric: bool) -> None:
    qc = w4a16_config(group, symmetric)
    n, k = 96, 256
    w = random_weight(n, k)
    enc = CT_W4A16.quantize(w, qc)
    specs = CT_W4A16.specs(n, k, qc)
    assert sorted(enc) == sorted(specs)
    for suffix, t in enc.items():
        assert tuple(t.shape) == specs[suffix].shape and SAFETENSORS_DTYPE.get(t.dtype, "I64") in specs[suffix].dtypes
    ours = CT_W4A16.dequantize(enc, qc)
    theirs = _ct_decompress({s: t.clone() for s, t in enc.items()}, qc).to(torch.float64)
    assert torch.equal(ours.to(torch.bfloat16), theirs.to(torch.bfloat16))  # the library decodes in the scale dtype
    assert torch.allclose(ours, theirs, rtol=2**-7, atol=0)
    g = group or k
    step = enc["weight_scale"].to(torch.float64).repeat_interleave(g, dim=1)
    assert bool(((ours - w).abs() <= step * 0.5 + 1e-12).all())  # round to nearest, extremes in range


@pytest.mark.parametrize("group,symmetric", [(128, True), (64, False)])
def test_ct_w4a16_packing_is_compressed_tensors_pack(group: int, symmetric: bool) -> None:
    """The exact words of compressed-tensors' ``pack_to_int32`` (codes + 8,
    along in; zero points along out)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    qc = w4a16_config(group, symmetric)
    enc = CT_W4A16.quantize(random_weight(64, 256), qc)
    codes = unpack_from_int32(enc["weight_packed"], 4, torch.Size([64, 256]))
    assert torch.equal(pack_to_int32(codes, 4), enc["weight_packed"])
    if not symmetric:
        zp = unpack_from_int32(enc["weight_zero_point"], 4, torch.Size([64, 256 // group]), packed_dim=0)
        assert torch.equal(pack_to_int32(zp, 4, packed_dim=0), enc["weight_zero_point"])
        assert int(zp.min()) >= -8 and int(zp.max()) <= 7 and bool((zp != 0).any())


FP8_CASES = [("channel", "dynamic"), ("tensor", "dynamic"), ("tensor", "static"), ("block", "dynamic")]


@pytest.mark.parametrize("weights,activations", FP8_CASES)
def test_ct_fp8_decode_equals_compressed_tensors(weights: str, activations: str) -> None:
    qc = fp8_config(weights, activations)
    # compressed-tensors' decompressor infers the block shape as rows // scale rows: whole blocks only
    # (partial blocks: expand_block_scale, tested with FP8 block above)
    n, k = 256 if weights == "block" else 200, 256
    w = random_weight(n, k)
    enc = CT_FP8.quantize(w, qc)
    specs = CT_FP8.specs(n, k, qc)
    assert sorted(enc) == sorted(specs)
    for suffix, t in enc.items():
        assert tuple(t.shape) == specs[suffix].shape and SAFETENSORS_DTYPE[t.dtype] in specs[suffix].dtypes
    ours = CT_FP8.dequantize(enc, qc)
    theirs = _ct_decompress({"weight": enc["weight"], "weight_scale": enc["weight_scale"]}, qc).to(torch.float64)
    assert torch.allclose(ours, theirs, rtol=2**-7, atol=0)
    assert torch.allclose(ours, w, rtol=2**-3, atol=float(enc["weight_scale"].float().max()) * 2**-6)


def test_ct_fp8_per_tensor_fused_members_keep_their_scales() -> None:
    """vLLM holds one per-tensor scale per fused member (and requantizes to
    the max after loading); the fallback decodes each member with its own."""
    qc = fp8_config("tensor")
    parts = [64, 32, 32]
    members = [random_weight(p, 128) for p in parts]
    enc = [CT_FP8.quantize(m, qc) for m in members]
    tensors = {"weight": torch.cat([e["weight"] for e in enc]),
               "weight_scale": torch.stack([e["weight_scale"].float().reshape(()) for e in enc])}  # fmt: skip
    fused = CT_FP8.dequantize_linear(tensors, qc, parts, torch.float64)
    assert torch.equal(fused, torch.cat([CT_FP8.dequantize(e, qc) for e in enc]))
    experts = {"weight": torch.stack([tensors["weight"][:64]] * 3),
               "weight_scale": torch.stack([tensors["weight_scale"][:2]] * 3)}  # fmt: skip
    stacked = CT_FP8.dequantize_experts(experts, qc, torch.float64)
    s0, s1 = (float(v) for v in tensors["weight_scale"][:2])
    rows = torch.tensor([s0] * 32 + [s1] * 32, dtype=torch.float64).unsqueeze(1)  # w1 rows, then w3 rows
    expected = tensors["weight"][:64].to(torch.float64) * rows
    assert stacked.shape == (3, 64, 128)
    assert all(torch.equal(stacked[e], expected) for e in range(3))


def test_ct_w4a16_stacked_experts_equal_per_expert_decode() -> None:
    qc = w4a16_config(128, False)
    enc = [CT_W4A16.quantize(random_weight(64, 256), qc) for _ in range(3)]
    stacked = {s: torch.stack([e[s] for e in enc]) for s in enc[0]}
    got = CT_W4A16.dequantize_experts(stacked, qc, torch.float32)
    for i, e in enumerate(enc):
        assert torch.equal(got[i], CT_W4A16.dequantize(e, qc).to(torch.float32))


def test_ct_detection_claims_one_format_each() -> None:
    from vllm_mixed.formats import detect_format

    for qc in (w4a16_config(128), w4a16_config(None, False)):
        assert detect_format(qc, "x") == "ct_w4a16"
    for weights, activations in FP8_CASES:
        assert detect_format(fp8_config(weights, activations), "x") == "ct_fp8"
    assert ct_common.ct_kind({"quant_method": "gptq"}) is None


def test_ct_ignore_and_targets_follow_vllm_matching() -> None:
    """vLLM's matching (re.match, anchored at the start only): the published
    ``re:.*mlp.gate$`` ignores the router and not gate_up_proj."""
    from vllm.model_executor.layers.quantization.utils.config_utils import is_equal_or_regex_match

    names = ["model.layers.0.mlp.gate", "model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.experts.3.gate_proj",
             "lm_head", "model.layers.0.self_attn.q_proj"]  # fmt: skip
    patterns = ["re:.*mlp.gate$", "re:.*mlp.gate", "lm_head", "re:.*self_attn", "model.layers.0.self_attn.q_proj"]
    for name in names:
        for pattern in patterns:
            assert ct_common.matches(name, pattern) == is_equal_or_regex_match(name, pattern), (name, pattern)


def test_ct_moe_rules_restate_vllms_checks() -> None:
    from vllm_mixed.models.base import Geometry
    from vllm_mixed.parallel import FAILS, OK, Parallel

    g = Geometry(hidden=2048, heads=32, kv_heads=4, head_dim=128, vocab=1024, experts=128, inter=768)
    one, four = Parallel(tp=1), Parallel(tp=4)
    per_token = fp8_config("tensor")
    per_token["config_groups"]["group_0"]["input_activations"]["strategy"] = "token"
    assert CT_FP8.moe_rule(768, g, one, fp8_config())[1] == OK
    assert CT_FP8.moe_rule(768, g, one, fp8_config("tensor", "static"))[1] == OK
    kernel, status, why = CT_FP8.moe_rule(768, g, one, per_token)
    assert status == FAILS and "tensor weights with token input activations" in why
    assert CT_FP8.moe_rule(192, g, four, fp8_config("block"))[1] == FAILS  # 768 / 4 is not whole 128-blocks
    assert CT_W4A16.moe_rule(768, g, one, w4a16_config(128)) == ("CompressedTensorsWNA16MoEMethod: Marlin MoE", OK, "")
    kernel, status, why = CT_W4A16.moe_rule(96, g, Parallel(tp=8), w4a16_config(128))
    assert status == FAILS and "intermediate_size_per_partition 96" in why and "group_size 128" in why
