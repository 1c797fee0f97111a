"""``export``: the merged compressed-tensors checkpoint of the tiny model, for
four recipes. Every exported tensor is decompressed with compressed-tensors'
own model-free dequantizer and compared exactly with the project's reference
decoder applied to the source tensors; the config parses with
compressed-tensors' own class and with stock vLLM's ``CompressedTensorsConfig``,
which routes every layer to the expected scheme. No vLLM engine is started."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import TinyModel
from vllm_mixed.errors import MixedError
from vllm_mixed.export import export
from vllm_mixed.formats import FORMATS
from vllm_mixed.plan import LoadPlan, build_plan
from vllm_mixed.recipe import load_recipe

EXPERTS_INT4 = {"targets": ["model.layers.*.mlp.experts"], "source": "int4"}
ATTENTION_FP8 = {"targets": ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"], "source": "fp8"}
RECIPES = {
    "mix": {},  # make-tiny's recipe: experts int4, everything else bf16
    "all-int4": {"default": "int4", "rules": []},
    "all-fp8": {"default": "fp8", "rules": []},
    "int4-experts-fp8-attention": {"rules": [EXPERTS_INT4, ATTENTION_FP8]},
}
SHARD_BYTES = 2**20  # the tiny model is ~5 MiB exported: several shards
# exported tensor suffix -> (dtype, shape) of a quantized [n, k] member, per source format
EXPORTED = {
    "unquantized": lambda n, k, qc: {"weight": (torch.bfloat16, [n, k])},
    "gptq_int4": lambda n, k, qc: {
        "weight_packed": (torch.int32, [n, k // 8]),
        "weight_scale": (torch.float16, [n, k // qc["group_size"]]),
        "weight_shape": (torch.int64, [2]),
    },
    "fp8_block": lambda n, k, qc: {
        "weight": (torch.float8_e4m3fn, [n, k]),
        "weight_scale": (torch.bfloat16, [math.ceil(n / 128), math.ceil(k / 128)]),
    },
}
SOURCE_SCALE = {"gptq_int4": "scales", "fp8_block": "weight_scale_inv"}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def exported(request, tiny_master: Path, tmp_path_factory) -> tuple[str, LoadPlan, Path]:
    tmp = tmp_path_factory.mktemp(f"export-{request.param}")
    recipe = TinyModel(tiny_master, tmp, relative=False).recipe(**RECIPES[request.param])
    plan = build_plan(load_recipe(recipe))
    out = export(plan, tmp / "out", shard_bytes=SHARD_BYTES, progress=False)
    return request.param, plan, out


def source_tensor(plan: LoadPlan, name: str) -> torch.Tensor:
    info = next(t for p in plan.layers for t in p.tensors if t.name == name)
    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(name)


def exported_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        part = load_file(shard)
        assert not set(part) & set(tensors), f"{shard.name} repeats tensors"
        tensors.update(part)
    return tensors


def test_names_shapes_dtypes_and_shards(exported):
    _, plan, out = exported
    tensors = exported_tensors(out)
    expected = {}
    for p in plan.layers:
        qc = plan.sources[p.source].quant_config
        for m in p.layer.members:
            if len(m.shape) == 1:
                expected[f"{m.name}.weight"] = (torch.bfloat16, list(m.shape))
            else:
                specs = EXPORTED[p.format](*m.shape, qc)
                expected.update({f"{m.name}.{s}": spec for s, spec in specs.items()})
    assert set(tensors) == set(expected)
    assert {n: (t.dtype, list(t.shape)) for n, t in tensors.items()} == expected
    for p in plan.layers:
        if p.format == "gptq_int4":
            assert all(tensors[f"{m.name}.weight_shape"].tolist() == list(m.shape) for m in p.layer.members)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(expected) and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # memory bound: a shard exceeds shard_bytes only when one tensor does
        sizes = [t.numel() * t.element_size() for t in load_file(shard).values()]
        assert sum(sizes) <= SHARD_BYTES or len(sizes) == 1
    assert not list(out.glob("*.partial"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (plan.base.path / name).read_bytes()


def test_decompressed_weights_equal_the_reference_exactly(exported):
    """What "exact" means here: compressed-tensors' own dequantizer
    (``CompressedTensorsDequantizer``: each scheme's compressor ``decompress``)
    applied to the exported tensors, computed in float64, is bit for bit
    (``torch.equal``) the project's reference decoder
    (``FORMATS[fmt].dequantize``, float64) applied to the source tensors with
    the source scale cast to the exported scale's dtype. For GPTQ that is
    (q - 8) * scale, for FP8 block fp8 * block scale. In float64 each code x
    scale product is exact (int4 x fp16: at most 15 significant bits; fp8 x
    bf16 or fp32: at most 4 + 24; float64 holds 53; float32 would round fp8 x
    fp32), so equality holds exactly when the exported codes and scales equal
    the source's. The library multiplies in the scale's dtype, so we hand it
    the stored scale upcast to float64 (exact); in fp16/bf16 its own product
    would round. Unquantized tensors (norms, embeddings, router, head, and
    layers routed to an unquantized source) must equal the source tensor cast
    to the recipe dtype (bfloat16)."""
    _, plan, out = exported
    assert_decompresses_exactly(plan, out)


def assert_decompresses_exactly(plan: LoadPlan, out: Path) -> None:
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    tensors = exported_tensors(out)
    stored_scale_dtype = {n: t.dtype for n, t in tensors.items() if n.endswith(".weight_scale")}
    tensors = {n: t.to(torch.float64) if n.endswith(".weight_scale") else t for n, t in tensors.items()}
    dequantizer = CompressedTensorsDequantizer(str(out), dtype=torch.float64)
    dequantizer.validate(tensors)
    weights = dequantizer.process(dict(tensors))

    checked = set()
    for p in plan.layers:
        qc = plan.sources[p.source].quant_config
        for m in p.layer.members:
            name = f"{m.name}.weight"
            got = weights[name]
            if p.format == "unquantized":
                want = source_tensor(plan, name).to(torch.bfloat16)
            else:
                src = {
                    t.name.rpartition(".")[2]: source_tensor(plan, t.name)
                    for t in p.tensors
                    if t.name.startswith(m.name + ".")
                }
                scale = SOURCE_SCALE[p.format]
                src[scale] = src[scale].to(stored_scale_dtype[f"{m.name}.weight_scale"])
                want = FORMATS[p.format].dequantize(src, qc, torch.float64)
                assert got.dtype == torch.float64
            assert got.shape == want.shape and torch.equal(got, want), name
            checked.add(name)
    assert checked == set(weights) and len(checked) == sum(len(p.layer.members) for p in plan.layers)


def test_fp8_float32_scales_pass_through_exactly(tiny, tmp_path):
    """Published FP8 checkpoints store fp32 scales; fp8 x fp32 is exact in
    float64 only, which the export and the comparison rely on."""
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    tiny.rewrite("fp8", name, lambda s: s.to(torch.float32) * (1 + 2**-20))  # 24 significant bits
    plan = build_plan(load_recipe(tiny.recipe(default="fp8", rules=[])))
    out = export(plan, tmp_path / "out", progress=False)
    assert exported_tensors(out)["model.layers.1.self_attn.o_proj.weight_scale"].dtype == torch.float32
    assert_decompresses_exactly(plan, out)


def test_config_parses_with_compressed_tensors_and_routes_in_vllm(exported):
    from compressed_tensors.quantization import QuantizationConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    recipe, plan, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    qc = config["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert qc["quant_method"] == "compressed-tensors" and parsed.quantization_status == "compressed"
    assert {"lm_head", "re:.*mlp[.]gate$"} <= set(parsed.ignore)
    formats = {
        "mix": ["pack-quantized"],
        "all-int4": ["pack-quantized"],
        "all-fp8": ["float-quantized"],
        "int4-experts-fp8-attention": ["float-quantized", "pack-quantized"],
    }[recipe]
    assert sorted(s.format for s in parsed.config_groups.values()) == formats
    assert parsed.format == (formats[0] if len(formats) == 1 else "mixed-precision")
    for scheme in parsed.config_groups.values():
        if scheme.format == "pack-quantized":
            assert (scheme.weights.num_bits, scheme.weights.strategy, scheme.weights.group_size) == (4, "group", 128)
            assert scheme.weights.symmetric and scheme.input_activations is None
        else:
            assert (scheme.weights.strategy, scheme.weights.block_structure) == ("block", [128, 128])
            inputs = scheme.input_activations
            assert (inputs.num_bits, inputs.type, inputs.strategy, inputs.group_size, inputs.dynamic) == (
                8, "float", "group", 128, True,
            )  # fmt: skip

    vllm_config = CompressedTensorsConfig.from_config(json.loads(json.dumps(qc)))
    vllm_config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}  # as Qwen3MoeForCausalLM's
    for p in plan.layers:
        if p.layer.kind == "norm":
            continue  # norms never reach a quantization method
        # vLLM asks for fused experts by expert 0's projections (get_moe_method)
        names = [f"{p.layer.name}.0.{proj}" for proj in ("gate_proj", "up_proj", "down_proj")]
        names = names if p.layer.kind == "experts" else [p.layer.name]
        for name in names:
            scheme = vllm_config.get_scheme_dict(torch.nn.Module(), name)
            if p.format == "unquantized":
                assert scheme is None, name
            elif p.format == "gptq_int4":
                assert scheme["format"] == "pack-quantized" and scheme["weights"].num_bits == 4, name
                assert vllm_config._is_wNa16_group_channel(scheme["weights"], scheme["input_activations"])
            else:
                assert scheme["format"] == "float-quantized" and scheme["weights"].strategy == "block", name
                assert vllm_config._is_fp8_w8a8(scheme["weights"], scheme["input_activations"])


def test_targets_are_compact_and_anchored(exported):
    recipe, _, out = exported
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = {s["format"]: s["targets"] for s in qc["config_groups"].values()}
    experts = r"re:model[.]layers[.]\d+[.]mlp[.]experts[.]\d+[.](?:gate_proj|up_proj|down_proj)$"
    attention = r"re:model[.]layers[.]\d+[.]self_attn[.](?:q_proj|k_proj|v_proj|o_proj)$"
    if recipe in ("mix", "all-int4", "int4-experts-fp8-attention"):
        assert experts in targets["pack-quantized"]
    if recipe == "mix":
        assert attention in qc["ignore"]
    if recipe in ("all-fp8", "int4-experts-fp8-attention"):
        assert attention in targets["float-quantized"]
    pattern = experts.removeprefix("re:")
    assert re.match(pattern, "model.layers.1.mlp.experts.7.down_proj")
    assert not re.match(pattern, "model.layers.1.mlp.experts.7.down_proj.x") and not re.match(
        pattern, "model.layers.1.mlp.gate"
    )


def test_partial_layer_sets_get_an_index_alternation(tiny_ro, tmp_path):
    rules = [{"targets": ["model.layers.1.mlp.experts"], "source": "int4"}]
    plan = build_plan(load_recipe(tiny_ro.recipe(rules=rules)))
    out = export(plan, tmp_path / "out", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == [r"re:model[.]layers[.](?:1)[.]mlp[.]experts[.]\d+[.](?:gate_proj|up_proj|down_proj)$"]
    assert r"re:model[.]layers[.](?:0)[.]mlp[.]experts[.]\d+[.](?:gate_proj|up_proj|down_proj)$" in qc["ignore"]
    assert len(list(out.glob("*.safetensors"))) == 1


def test_all_unquantized_writes_a_plain_checkpoint(tiny_ro, tmp_path):
    plan = build_plan(load_recipe(tiny_ro.recipe(base="fp8", rules=[])))  # all bf16, config from the fp8 source
    out = export(plan, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in exported_tensors(out).values())


def test_refuses_a_directory_holding_safetensors(tiny_ro, tmp_path):
    plan = build_plan(load_recipe(tiny_ro.recipe()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(
        MixedError, match=r"already holds a checkpoint \(model-00001-of-00002.safetensors\).*new or empty"
    ):
        export(plan, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00002.safetensors"]


def test_refuses_asymmetric_gptq(tiny, tmp_path):
    qc = tiny.config("int4")["quantization_config"]
    tiny.set_config("int4", quantization_config={**qc, "sym": False})
    plan = build_plan(load_recipe(tiny.recipe_path))
    with pytest.raises(MixedError, match=r"source 'int4'.*sym: false is not exported.*symmetric GPTQ"):
        export(plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_nonsymmetric_zero_points(tiny, tmp_path):
    name = "model.layers.0.mlp.experts.3.up_proj.qzeros"
    tiny.rewrite("int4", name, lambda z: z + 1)
    plan = build_plan(load_recipe(tiny.recipe_path))
    with pytest.raises(MixedError, match=re.escape(f"tensor {name} is not all 0x77777777")):
        export(plan, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*safetensors*"))


def test_cmd_export(tiny_ro, tmp_path, capsys):
    from vllm_mixed.cli import build_parser, main

    args = build_parser().parse_args(
        ["export", str(tiny_ro.recipe()), "-o", str(tmp_path / "out"), "--shard-size", "1MiB"]
    )
    assert args.shard_size == 2**20
    assert main(["export", str(tiny_ro.recipe()), "-o", str(tmp_path / "out"), "--shard-size", "1MiB"]) == 0
    printed = capsys.readouterr().out
    assert f"exported {tmp_path / 'out'}" in printed and "shards" in printed and "vllm serve" in printed
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", str(tiny_ro.recipe()), "-o", "x", "--shard-size", "lots"])
