"""Bad input through ``vllm-mixed plan``: exit status 2, one message on
stderr that names the culprit and the fix, no traceback (unless --debug)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_mixed.cli import main


def fails(
    capsys: pytest.CaptureFixture[str], recipe: Path, *extra: str, command: str = "plan", after: tuple[str, ...] = ()
) -> str:
    """Run ``command`` (``plan``) on ``recipe`` expecting bad input; returns stderr."""
    rc = main([*extra, command, str(recipe), *after])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    assert err.startswith("vllm-mixed: error: ")
    assert err.count("vllm-mixed: error: ") == 1
    return err


def test_missing_source_directory(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tiny.src("fp8"))
    err = fails(capsys, tiny.recipe_path)
    assert f"source 'fp8' ({tiny.src('fp8')}): directory does not exist" in err
    assert "fix the path under 'sources:' in the recipe" in err


def test_source_is_a_file(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny.recipe(sources={"bf16": "bf16", "fp8": "fp8/config.json", "int4": "gptq-int4"})
    err = fails(capsys, path)
    assert f"source 'fp8' ({tiny.src('fp8') / 'config.json'}): is a file, not a checkpoint directory" in err
    assert "point the source at the directory holding config.json" in err


def test_source_without_config(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    (tiny.src("int4") / "config.json").unlink()
    err = fails(capsys, tiny.recipe_path)
    assert f"source 'int4' ({tiny.src('int4')}): no config.json" in err
    assert "Hugging Face model directory with config.json and safetensors shards" in err


def test_index_names_missing_shard(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shard = tiny.shards("bf16")[1]
    shard.unlink()
    err = fails(capsys, tiny.recipe_path)
    assert f"{tiny.src('bf16') / 'model.safetensors.index.json'}: names shard '{shard.name}'" in err
    assert "download the missing shard or regenerate the index" in err


def test_tensor_missing_from_every_shard(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name = "model.layers.1.self_attn.o_proj.weight"
    tiny.rewrite("bf16", name, lambda t: None)
    err = fails(capsys, tiny.recipe_path)
    assert f"source 'bf16' ({tiny.src('bf16')}): tensor {name!r} is in no shard" in err
    assert "layer 'model.layers.1.self_attn.o_proj'" in err
    assert "check the source is the unquantized checkpoint of this model, or route the layer elsewhere" in err


def test_data_region_truncated(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shard = tiny.shards("int4")[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    err = fails(capsys, tiny.recipe_path)
    assert f"{shard}: truncated: tensor '" in err
    assert f"re-download or re-export {shard.name}" in err


@pytest.mark.parametrize("where", ["length", "json"])
def test_header_bytes_garbage(tiny: Any, capsys: pytest.CaptureFixture[str], where: str) -> None:
    shard = tiny.shards("fp8")[0]
    data = bytearray(shard.read_bytes())
    if where == "length":
        data[:8] = b"\xde\xad\xbe\xef\xde\xad\xbe\xef"
    else:
        data[8:24] = b"\x00garbage\xff\xfe!!!!!!"
    shard.write_bytes(bytes(data))
    err = fails(capsys, tiny.recipe_path)
    assert str(shard) in err
    expected = "safetensors header claims" if where == "length" else "safetensors header is not valid JSON"
    assert expected in err
    assert f"the file is damaged or not safetensors; re-download or re-export {shard.name}" in err


def test_tensor_shape_disagrees_with_config(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = tiny.rewrite("bf16", name, lambda t: t[:384].clone())
    err = fails(capsys, tiny.recipe_path)
    assert f"{shard}: tensor {name!r} has shape [384, 256] but the model config implies [512, 256]" in err
    assert "the source is a different model or its config.json is wrong" in err


@pytest.mark.parametrize("key,value", [("hidden_size", 512), ("num_experts", 16), ("num_hidden_layers", 3)])
def test_sources_are_different_models(tiny: Any, capsys: pytest.CaptureFixture[str], key: str, value: int) -> None:
    old = tiny.config("int4")[key]
    tiny.set_config("int4", **{key: value})
    err = fails(capsys, tiny.recipe_path)
    assert "sources 'bf16' and 'int4' are different models" in err
    assert f"config.json {key!r} is {old!r} in {tiny.src('bf16')} but {value!r} in {tiny.src('int4')}" in err
    assert "every source must be a checkpoint of the same model" in err


@pytest.mark.parametrize(
    "source,name,change,got,allowed",
    [
        (
            "bf16",
            "model.layers.0.self_attn.k_proj.weight",
            lambda t: t.to(torch.float8_e4m3fn),
            "F8_E4M3",
            "BF16 or F16 or F32",
        ),
        ("int4", "model.layers.1.mlp.experts.5.up_proj.qweight", lambda t: t.to(torch.float32), "F32", "I32"),
        ("fp8", "model.layers.0.self_attn.o_proj.weight", lambda t: t.to(torch.bfloat16), "BF16", "F8_E4M3"),
    ],
)
def test_tensor_dtype_not_of_source_format(
    tiny: Any, capsys: pytest.CaptureFixture[str], source: str, name: str, change: Any, got: str, allowed: str
) -> None:
    shard = tiny.rewrite(source, name, change)
    err = fails(capsys, tiny.recipe_path)
    assert f"{shard}: tensor {name!r} is {got}, but source {source!r} is" in err
    assert f"must be {allowed};" in err
    assert "the file does not match its config.json" in err


def test_rule_naming_unknown_source(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny.recipe(rules=[{"targets": ["model.layers.*.mlp.experts"], "source": "gptq"}])
    err = fails(capsys, path)
    assert str(path) in err
    assert "rules[0].source: 'gptq' (rule for ['model.layers.*.mlp.experts']) is not a source" in err
    assert "use one of: bf16, fp8, int4, or add it under 'sources:'" in err


@pytest.mark.parametrize(
    "target,layer,members",
    [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"]),
        (
            "model.layers.0.mlp.experts.3.*",
            "model.layers.0.mlp.experts",
            ["experts.3.gate_proj", "experts.0.gate_proj"],
        ),
        ("model.layers.*.self_attn.[qk]_proj", "model.layers.0.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"]),
    ],
)
def test_fused_layer_conflict(
    tiny: Any, capsys: pytest.CaptureFixture[str], target: str, layer: str, members: list[str]
) -> None:
    err = fails(capsys, tiny.recipe(rules=[{"targets": [target], "source": "fp8"}]))
    assert f"fused layer {layer!r} would mix sources: bf16 (default): " in err
    assert "fp8 (rule 0): " in err
    for member in members:
        assert f"{layer.rsplit('.', 1)[0]}.{member}" in err
    assert f"make one rule cover the whole layer (target {layer!r})" in err


def test_yaml_syntax_error(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny.root / "broken.yaml"
    path.write_text("sources:\n  bf16: bf16\nbase: bf16\n default: bf16\n")
    err = fails(capsys, path)
    assert f"recipe {path}: YAML syntax error at line 4, column " in err
    assert "fix the YAML (indentation, quotes, colons)" in err


@pytest.mark.parametrize("where", ["top", "rule"])
def test_unknown_key(tiny: Any, capsys: pytest.CaptureFixture[str], where: str) -> None:
    if where == "top":
        path = tiny.recipe(precision="int4")
        expected = "unknown key 'precision'; allowed keys here: base, default, dtype, kernels, rules, sources"
    else:
        path = tiny.recipe(rules=[{"targets": ["lm_head"], "source": "fp8", "quant": "fp8"}])
        expected = "unknown key 'rules[0].quant'; allowed keys here: source, targets"
    err = fails(capsys, path)
    assert f"recipe {path}: " in err
    assert expected in err


def test_no_default_and_unmatched_layer(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(capsys, tiny.recipe(default=...))
    assert "layer 'model.embed_tokens' matches no rule and the recipe has no 'default'" in err
    assert "add 'default: <source>' or a rule whose targets match it" in err


def test_no_default_fused_partly_matched(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # every name but v_proj of layer 0 and its fused layer's name
    rules = [{"targets": ["re:(?!model\\.layers\\.0\\.self_attn\\.(v|qkv)_proj$).*"], "source": "bf16"}]
    err = fails(capsys, tiny.recipe(default=..., rules=rules))
    assert "fused layer 'model.layers.0.self_attn.qkv_proj' would mix sources" in err
    assert "no source (no rule matches and the recipe has no 'default'): model.layers.0.self_attn.v_proj" in err


class _Explode:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickle_only_checkpoint(tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pickled = tiny.root / "pickled"
    pickled.mkdir()
    shutil.copy(tiny.src("bf16") / "config.json", pickled)
    sentinel = tmp_path / "was-unpickled"
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Explode(sentinel)))
    path = tiny.recipe(sources={"bf16": "bf16", "fp8": "fp8", "int4": "gptq-int4", "pt": "pickled"})
    err = fails(capsys, path)
    assert f"source 'pt' ({pickled}): holds only PyTorch pickle weights (pytorch_model.bin)" in err
    assert "never unpickles" in err
    assert f"M.from_pretrained('{pickled}').save_pretrained('OUT', safe_serialization=True)" in err
    assert "point the recipe at OUT" in err
    assert not sentinel.exists()


def test_missing_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(capsys, tmp_path / "nope.yaml")
    assert f"recipe {tmp_path / 'nope.yaml'}: no such file; pass the path of a recipe YAML" in err


def test_base_config_missing_model_key(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("bf16", "fp8", "int4"):
        tiny.set_config(name, moe_intermediate_size=None)
    err = fails(capsys, tiny.recipe_path)
    assert (
        f"base 'bf16' ({tiny.src('bf16')}/config.json): 'moe_intermediate_size' is None, not a positive integer" in err
    )
    assert "restore the checkpoint's config.json" in err


def test_debug_shows_traceback(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tiny.src("fp8"))
    rc = main(["--debug", "plan", str(tiny.recipe_path)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "Traceback (most recent call last)" in err
    assert "MixedError" in err
    assert f"vllm-mixed: error: source 'fp8' ({tiny.src('fp8')}): directory does not exist" in err


# --- AWQ and act-order GPTQ sources (tiny Llama: bf16, awq, gptq-int4-actorder) --------------------------------


@pytest.fixture(scope="module")
def variants_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_mixed.formats import UNQUANTIZED
    from vllm_mixed.formats.awq import AWQ
    from vllm_mixed.formats.gptq_variants import act_order_tiny
    from vllm_mixed.tiny import make_tiny

    root = tmp_path_factory.mktemp("variants") / "model"
    make_tiny(root, arch="llama", formats=(UNQUANTIZED, AWQ, act_order_tiny()))
    return root


@pytest.fixture
def variants(variants_master: Path, tmp_path: Path) -> Any:
    from tests.conftest import TinyModel

    root = tmp_path / "model"
    shutil.copytree(variants_master, root)
    return TinyModel(root, tmp_path, relative=False)


def test_awq_qweight_in_gptq_order(variants: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """AWQ packs along the output dim; a GPTQ-packed qweight ([in/8, out])
    under an AWQ config is named as such. (An AWQ qweight whose nibbles are
    merely not interleaved has the right shape and dtype: headers cannot
    tell, only the decoded weights could.)"""
    from vllm_mixed.formats.awq import awq_unpack
    from vllm_mixed.formats.gptq_pack import pack_bits

    name = "model.layers.0.self_attn.q_proj.qweight"
    shard = variants.rewrite("awq", name, lambda t: pack_bits(awq_unpack(t), 0, 4))
    k = variants.config("awq")["hidden_size"]
    err = fails(capsys, variants.recipe(default="awq"))
    assert f"{shard}: tensor {name!r} has shape [{k // 8}, " in err
    assert "that is GPTQ's layout [in/8, out] (packed along the input dim), not AWQ's [in, out/8]" in err
    assert "fix quantization_config.quant_method" in err


def test_awq_zero_points_missing(variants: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name = "model.layers.1.mlp.down_proj.qzeros"
    variants.rewrite("awq", name, lambda t: None)
    err = fails(capsys, variants.recipe(default="awq"))
    assert f"tensor {name!r} is in no shard, but layer 'model.layers.1.mlp.down_proj' routed to this source" in err
    assert "AWQ GEMM (zero_point: true) stores each group's zero points there" in err


def test_awq_scales_transposed(variants: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name = "model.layers.0.mlp.down_proj.scales"
    variants.rewrite("awq", name, lambda t: t.t().contiguous())
    err = fails(capsys, variants.recipe(default="awq"))
    assert f"tensor {name!r} has shape" in err and "that is scales transposed ([out, groups])" in err


@pytest.mark.parametrize(
    "directory,change,expected",
    [
        ("awq", {"group_size": 256}, "group_size=256 (vLLM's AWQ kernels take -1, 32, 64, 128"),
        ("awq", {"bits": 8}, "bits=8 (vLLM's AWQ kernels read 4-bit only)"),
        ("awq", {"version": "gemv_fast"}, "version='gemv_fast' (only AutoAWQ's 'gemm' packing"),
        ("gptq-int4-actorder", {"bits": 3}, "bits=3 (4 and 8 are supported: vLLM's GPTQ kernels)"),
    ],
)
def test_quantization_config_the_kernels_refuse(
    variants: Any, capsys: pytest.CaptureFixture[str], directory: str, change: dict, expected: str
) -> None:
    qc = variants.config(directory)["quantization_config"]
    variants.set_config(directory, quantization_config={**qc, **change})
    err = fails(capsys, variants.recipe())
    assert f"({variants.src(directory)}) config.json: unsupported" in err and expected in err


def test_act_order_g_idx_missing(variants: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name = "model.layers.0.self_attn.k_proj.g_idx"
    variants.rewrite("gptq-int4-actorder", name, lambda t: None)
    err = fails(capsys, variants.recipe(default="int4a"))
    assert f"tensor {name!r} is in no shard, but layer 'model.layers.0.self_attn.qkv_proj'" in err
    assert "the config declares desc_act: true (act-order), whose column-to-group map is this tensor" in err


def test_act_order_export_refused(variants: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Act-order groups are not contiguous: only compressed-tensors'
    ``weight_g_idx`` could carry them, which vLLM 0.32 does not read."""
    out = tmp_path / "export"
    err = fails(capsys, variants.recipe(default="int4a"), command="export", after=("-o", str(out)))
    assert "source 'int4a'" in err and "desc_act: true is not exported" in err
    assert "route these layers to a desc_act: false checkpoint" in err.lower()
    assert not out.exists() or not list(out.glob("*.safetensors"))


# --- compressed-tensors sources ---------------------------------------------------------------------------------

from vllm_mixed.formats.ct_fp8 import CT_FP8, fp8_config  # noqa: E402
from vllm_mixed.formats.ct_w4a16 import CT_W4A16, w4a16_config  # noqa: E402


@pytest.fixture(scope="module")
def ct_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_mixed.formats import UNQUANTIZED
    from vllm_mixed.tiny import make_tiny

    root = tmp_path_factory.mktemp("ct-master") / "model"
    make_tiny(root, formats=(UNQUANTIZED, CT_W4A16, CT_FP8))
    return root


@pytest.fixture
def ct(ct_master: Path, tmp_path: Path) -> Any:
    from tests.conftest import TinyModel

    root = tmp_path / "model"
    shutil.copytree(ct_master, root)
    model = TinyModel(root, root, relative=True)
    body = {"sources": {"bf16": "bf16", "w4": "ct-w4a16", "f8": "ct-fp8"}, "base": "bf16", "default": "bf16",
            "dtype": "bfloat16", "rules": [{"targets": ["model.layers.*.mlp.experts"], "source": "w4"},
                                           {"targets": ["model.layers.*.self_attn.*"], "source": "f8"}]}  # fmt: skip
    import yaml

    (root / "recipe.yaml").write_text(yaml.safe_dump(body))
    return model


def test_ct_tiny_recipe_plans(ct: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(ct.recipe_path)]) == 0
    out = capsys.readouterr().out
    assert "ct_w4a16     int4-g128" in out and "ct_fp8       fp8-channel-dynamic" in out


def test_ct_weight_packed_along_the_wrong_dim(ct: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Packed along out ([out/8, in], GPTQ-like) instead of along in ([out, in/8])."""
    name = "model.layers.0.mlp.experts.3.down_proj.weight_packed"
    shard = ct.rewrite("ct-w4a16", name, lambda t: torch.zeros(t.shape[0] // 8, t.shape[1] * 8, dtype=torch.int32))
    err = fails(capsys, ct.recipe_path)
    assert f"{shard}: tensor {name!r} has shape [32, 256] but the model config implies [256, 32] for ct_w4a16" in err


def test_ct_zero_point_missing_for_asymmetric_scheme(ct: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ct.set_config("ct-w4a16", quantization_config=w4a16_config(128, symmetric=False))
    err = fails(capsys, ct.recipe_path)
    assert (
        f"source 'w4' ({ct.src('ct-w4a16')}): tensor 'model.layers.0.mlp.experts.0.gate_proj.weight_zero_point'" in err
    )
    assert "is in no shard, but layer 'model.layers.0.mlp.experts' routed to this source as ct_w4a16 needs it" in err


def test_ct_group_size_that_does_not_divide(ct: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ct.set_config("ct-w4a16", quantization_config=w4a16_config(96))
    err = fails(capsys, ct.recipe_path)
    assert f"source 'w4' ({ct.src('ct-w4a16')}): layer 'model.layers.0.mlp.experts'" in err
    assert "compressed-tensors W4A16 group_size 96 does not divide a linear's in_features 256" in err
    assert "use a checkpoint quantized with a group size that divides every input size" in err


def test_ct_group_size_the_gpu_kernels_refuse(ct: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Group 16 (the CPU int4 GEMM takes it): no CUDA int4 GEMM vLLM picks from does."""
    qc = w4a16_config(16)
    ct.set_config("ct-w4a16", quantization_config=qc)
    for f in ct.shards("ct-w4a16"):  # rewrite every weight in the new group size
        from safetensors.torch import load_file, save_file

        tensors = load_file(f)
        for key in [k for k in tensors if k.endswith(".weight_scale")]:
            tensors[key] = torch.full((tensors[key].shape[0], tensors[key].shape[1] * 8), 0.01, dtype=torch.bfloat16)
        save_file(tensors, f)
    body = ct.recipe_data() | {"rules": [{"targets": ["model.layers.*.self_attn.*"], "source": "w4"}]}
    import yaml

    (ct.root / "g16.yaml").write_text(yaml.safe_dump(body))
    rc = main(["plan", str(ct.root / "g16.yaml"), "--tp", "1"])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out + err
    assert "CompressedTensorsWNA16" in out + err and "no int4 kernel accepts" in out + err, out + err


def test_ct_unsupported_schemes(ct: Any, capsys: pytest.CaptureFixture[str]) -> None:
    int8 = fp8_config("channel") | {"format": "int-quantized"}
    group = int8["config_groups"]["group_0"]
    group["weights"] |= {"type": "int"}
    group["input_activations"] |= {"type": "int"}
    sparse = w4a16_config() | {"format": "sparse-24-bitmask",
                               "sparsity_config": {"format": "sparse-24-bitmask", "targets": ["Linear"]}}  # fmt: skip
    mixed = w4a16_config()
    mixed["config_groups"]["group_1"] = fp8_config()["config_groups"]["group_0"] | {"format": "float-quantized"}
    cases = [
        (int8, "its scheme is int-quantized: weights int8 channel, input activations int8 token dynamic"),
        (sparse, "it is sparse (sparse-24-bitmask; vLLM removed compressed-tensors sparsity support)"),
        (mixed, "its config_groups use different schemes (group_0 (pack-quantized: weights int4 group 128"),
    ]
    for qc, why in cases:
        ct.set_config("ct-w4a16", quantization_config=qc)
        err = fails(capsys, ct.recipe_path)
        assert f"source 'w4' ({ct.src('ct-w4a16')})" in err and "unsupported compressed-tensors checkpoint: " in err
        assert why in err, err
        assert "vllm-mixed reads compressed-tensors pack-quantized W4A16" in err
        assert "route these layers to another source" in err


def test_ct_fp8_static_input_scale_missing(ct: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ct.set_config("ct-fp8", quantization_config=fp8_config("tensor", "static"))
    err = fails(capsys, ct.recipe_path)
    assert "tensor 'model.layers.0.self_attn.q_proj.weight_scale' has shape [512, 1]" in err
    assert "implies [1] for ct_fp8" in err


def test_ct_fused_layer_partly_ignored(ct: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ct.set_config("ct-fp8", quantization_config=fp8_config(ignore=["lm_head", "re:.*mlp.gate$", "re:.*k_proj$"]))
    err = fails(capsys, ct.recipe_path)
    assert "fused layer 'model.layers.0.self_attn.qkv_proj' is partly quantized" in err
    assert "ignored or untargeted: model.layers.0.self_attn.k_proj" in err
    assert "Fix the checkpoint's ignore/targets, or route the layer to another source" in err


def test_gptq_dynamic_rule_giving_another_precision(variants: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """GPTQModel's positive ``dynamic`` override (8-bit MLP in a 4-bit
    checkpoint): a source holds one precision here; the rule is named."""
    qc = variants.config("gptq-int4-actorder")["quantization_config"]
    variants.set_config("gptq-int4-actorder", quantization_config={**qc, "dynamic": {r"+:.*mlp\..*": {"bits": 8}}})
    err = fails(capsys, variants.recipe())
    assert "unsupported GPTQ checkpoint: dynamic rule '.*mlp\\\\..*' gives the modules it matches another " in err
    assert "precision ({'bits': 8}); a source has one precision here" in err


def test_gptq_dynamic_rule_on_one_fused_member(variants: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A negative rule naming q_proj only: vLLM matches the fused qkv_proj
    and would read it quantized, so the checkpoint cannot be served."""
    qc = variants.config("gptq-int4-actorder")["quantization_config"]
    variants.set_config(
        "gptq-int4-actorder", quantization_config={**qc, "dynamic": {r"-:.*\.0\.self_attn\.q_proj": {}}}
    )
    err = fails(capsys, variants.recipe(default="int4a"))
    assert (
        "dynamic rule '-:.*\\.0\\.self_attn\\.q_proj' leaves 'model.layers.0.self_attn.q_proj' unquantized but " in err
    )
    assert "not the fused layer 'model.layers.0.self_attn.qkv_proj' it belongs to" in err


def test_gptq_dynamic_negative_rule_reads_the_layer_in_float(variants: Any) -> None:
    """A negative rule on a whole vLLM layer (GPTQModel leaves it in float):
    the plan reads that layer's float weight from the GPTQ source, and a
    GPTQ qweight still there is not what it asks for."""
    import torch

    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe

    qc = variants.config("gptq-int4-actorder")["quantization_config"]
    variants.set_config("gptq-int4-actorder", quantization_config={**qc, "dynamic": {r"-:.*\.1\.mlp\.down_proj": {}}})
    import json

    from safetensors.torch import load_file, save_file

    name, src = "model.layers.1.mlp.down_proj", "gptq-int4-actorder"
    weight = load_file(variants.shard_of("bf16", f"{name}.weight"))[f"{name}.weight"].to(torch.float16)
    shard = variants.shard_of(src, f"{name}.qweight")
    tensors = {k: v for k, v in load_file(shard).items() if not k.startswith(f"{name}.")}
    save_file({**tensors, f"{name}.weight": weight}, shard, metadata={"format": "pt"})
    index = variants.index(src)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(f"{name}.")}
    index["weight_map"][f"{name}.weight"] = shard.name
    (variants.src(src) / "model.safetensors.index.json").write_text(json.dumps(index))
    plan = build_plan(load_recipe(variants.recipe(default="int4a")))
    formats = {p.layer.name: p.format for p in plan.layers}
    assert formats[name] == "unquantized" and formats["model.layers.1.mlp.gate_up_proj"] == "gptq_int4"
