"""The architecture registry: each architecture's layer table (vLLM layer
names, fused members, shapes, parallel style), geometry and tiny model, and
the refusal of architectures that are not registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_mixed.cli import main
from vllm_mixed.errors import MixedError
from vllm_mixed.models import MODELS, Layer, geometry_for, layers_for, model_named
from vllm_mixed.parallel import OK, Parallel
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.tiny import make_tiny


def test_registry_names_and_refusal() -> None:
    assert {
        "Qwen3MoeForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM",
        "MixtralForCausalLM", "Qwen2MoeForCausalLM",
    } <= set(MODELS)  # fmt: skip
    with pytest.raises(MixedError) as err:
        layers_for({"architectures": ["GPT2LMHeadModel"]}, "base 'x'")
    msg = str(err.value)
    assert msg.startswith("base 'x': architectures ['GPT2LMHeadModel'] are not supported; supported: ")
    assert (
        "supported: LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM, "
        "Qwen3ForCausalLM, Qwen3MoeForCausalLM"
    ) in msg
    with pytest.raises(
        MixedError, match="--arch 'gpt2' is not a supported architecture; supported: llama, mixtral, qwen2, qwen2-moe"
    ):
        model_named("gpt2")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_layer_table(arch: str) -> None:
    spec = model_named(arch)
    cfg = dict(spec.tiny_config)
    layers = {layer.name: layer for layer in layers_for(cfg, "tiny")}
    per_layer = 6 if arch == "llama" else 8  # 2 norms, qkv, o, gate_up, down (and the q/k norms)
    assert len(layers) == 1 + per_layer * cfg["num_hidden_layers"] + 2
    qkv = layers["model.layers.1.self_attn.qkv_proj"]
    assert (qkv.kind, qkv.group, qkv.parallel) == ("linear", "attention", "qkv")
    assert [(m.name, m.shape) for m in qkv.members] == [
        ("model.layers.1.self_attn.q_proj", (512, 256)),
        ("model.layers.1.self_attn.k_proj", (256, 256)),
        ("model.layers.1.self_attn.v_proj", (256, 256)),
    ]
    gate_up = layers["model.layers.0.mlp.gate_up_proj"]
    assert (gate_up.parallel, [m.name for m in gate_up.members]) == (
        "column", ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    )  # fmt: skip
    assert layers["model.layers.0.mlp.down_proj"].members[0].shape == (256, 512)
    assert layers["model.layers.0.mlp.down_proj"].parallel == "row"
    assert ("model.layers.0.self_attn.q_norm" in layers) == (arch == "qwen3")
    tied = layers_for(dict(cfg, tie_word_embeddings=True), "tiny")
    assert "lm_head" not in {layer.name for layer in tied}
    g = geometry_for(cfg, "tiny")
    assert (g.hidden, g.heads, g.kv_heads, g.head_dim, g.experts) == (256, 4, 2, 128, 0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_dense_model_plans_and_shards_at_tp2(
    arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dirs = make_tiny(tmp_path / arch, arch=arch)
    plan = build_plan(load_recipe(dirs["recipe"]))
    routed = {(p.layer.group, p.source, p.format) for p in plan.layers}
    assert ("mlp", "int4", "gptq_int4") in routed and ("attention", "bf16", "unquantized") in routed
    assert plan.unused_rules == []
    assert {c.status for c in plan.shard_checks(Parallel(2))} == {OK}
    assert main(["plan", str(dirs["recipe"]), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "mlp" in out and "AutoGPTQLinearMethod: Machete" in out


def test_make_tiny_formats_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-tiny", str(tmp_path / "t"), "--arch", "llama", "--formats", "bf16,gptq_int4"]) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["bf16", "gptq-int4", "recipe.yaml"]
    assert "source: int4" in (tmp_path / "t" / "recipe.yaml").read_text()
    capsys.readouterr()
    assert main(["make-tiny", str(tmp_path / "u"), "--formats", "exl2"]) == 2
    assert "--formats 'exl2': unknown ['exl2']" in capsys.readouterr().err


def test_make_tiny_writes_the_other_published_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--formats`` by directory name writes the other published layouts of
    registered formats (act-order and channelwise GPTQ, CT W4A16 group 64
    asymmetric, CT FP8 per-tensor static and block): each config says so,
    its headers hold the tensors only that layout has, and plan reads each."""
    import json

    from vllm_mixed.safetensors_header import read_header

    names = "gptq-int4-actorder,gptq-int4-channel,ct-w4a16-asym-g64,ct-fp8-tensor-static,ct-fp8-block"
    assert main(["make-tiny", str(tmp_path / "t"), "--arch", "mixtral", "--formats", f"bf16,{names}"]) == 0
    capsys.readouterr()
    root = tmp_path / "t"

    def qc(d: str) -> dict:
        return json.loads((root / d / "config.json").read_text())["quantization_config"]

    def tensors(d: str) -> dict:
        return {k: v for f in sorted((root / d).glob("*.safetensors")) for k, v in read_header(f).items()}

    assert (qc("gptq-int4-actorder")["desc_act"], qc("gptq-int4-channel")["group_size"]) == (True, -1)
    (w4,) = qc("ct-w4a16-asym-g64")["config_groups"].values()
    assert (w4["weights"]["group_size"], w4["weights"]["symmetric"]) == (64, False)
    (static,) = qc("ct-fp8-tensor-static")["config_groups"].values()
    assert (static["weights"]["strategy"], static["input_activations"]["dynamic"]) == ("tensor", False)
    (block,) = qc("ct-fp8-block")["config_groups"].values()
    assert (block["weights"]["strategy"], block["weights"]["block_structure"]) == ("block", [128, 128])
    expert = "model.layers.0.block_sparse_moe.experts.0.w1"
    assert f"{expert}.g_idx" in tensors("gptq-int4-actorder")
    assert f"{expert}.weight_zero_point" in tensors("ct-w4a16-asym-g64")
    assert f"{expert}.input_scale" in tensors("ct-fp8-tensor-static")
    out_f, in_f = tensors("ct-fp8-block")[f"{expert}.weight"].shape
    assert tensors("ct-fp8-block")[f"{expert}.weight_scale"].shape == (-(-out_f // 128), -(-in_f // 128))
    recipe = (root / "recipe.yaml").read_text()
    for source in ("int4a", "int4c", "ctint4a", "ctfp8s", "ctfp8b"):
        assert f"  {source}: " in recipe
        body = recipe.replace("default: bf16", f"default: {source}")
        (root / f"{source}.yaml").write_text(body)
        plan = build_plan(load_recipe(root / f"{source}.yaml"))
        assert {p.format for p in plan.layers if p.layer.kind == "experts"} == {
            "gptq_int4" if source.startswith("int4") else "ct_w4a16" if source == "ctint4a" else "ct_fp8"
        }, source


def test_qwen2_biases_are_float_members_in_every_format(tmp_path: Path) -> None:
    """Qwen2's q/k/v biases: members with ``bias``, planned from every
    source in that checkpoint's float dtype (fp16 beside GPTQ, bf16 beside
    FP8), kept through the composed table, absent from o_proj and the MLP."""
    cfg = dict(model_named("qwen2").tiny_config)
    layers = {layer.name: layer for layer in layers_for(cfg, "tiny")}
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert [m.bias for m in qkv.members] == [True, True, True]
    assert not any(m.bias for n, layer in layers.items() if n != qkv.name and "qkv" not in n for m in layer.members)
    assert Layer.from_dict(qkv.name, qkv.to_dict()) == qkv
    assert geometry_for(cfg, "tiny").head_dim == 128  # hidden / heads, as vLLM's Qwen2Attention computes it
    dirs = make_tiny(tmp_path, arch="qwen2")
    for source, dtype in (("int4", "F16"), ("fp8", "BF16"), ("bf16", "BF16")):
        plan = build_plan(load_recipe(dirs["recipe"]).only(source))
        (p,) = [p for p in plan.layers if p.layer.name == qkv.name]
        biases = {t.name: (t.dtype, t.shape) for t in p.tensors if t.name.endswith(".bias")}
        assert biases == {
            "model.layers.0.self_attn.q_proj.bias": (dtype, (512,)),
            "model.layers.0.self_attn.k_proj.bias": (dtype, (256,)),
            "model.layers.0.self_attn.v_proj.bias": (dtype, (256,)),
        }, source


def test_moe_layer_tables() -> None:
    mixtral = {layer.name: layer for layer in layers_for(dict(model_named("mixtral").tiny_config), "tiny")}
    experts = mixtral["model.layers.1.block_sparse_moe.experts"]
    assert (experts.kind, experts.parallel, len(experts.members)) == ("experts", "experts", 8 * 3)
    assert [(m.name, m.shape) for m in experts.members[:3]] == [
        ("model.layers.1.block_sparse_moe.experts.0.w1", (256, 256)),
        ("model.layers.1.block_sparse_moe.experts.0.w2", (256, 256)),
        ("model.layers.1.block_sparse_moe.experts.0.w3", (256, 256)),
    ]
    gate = mixtral["model.layers.1.block_sparse_moe.gate"]
    assert (gate.kind, gate.parallel, gate.members[0].shape) == ("router", "replicated", (8, 256))
    assert "model.layers.0.mlp.gate_up_proj" not in mixtral
    qwen2_moe = {layer.name: layer for layer in layers_for(dict(model_named("qwen2-moe").tiny_config), "tiny")}
    shared = qwen2_moe["model.layers.0.mlp.shared_expert.gate_up_proj"]
    assert (shared.kind, shared.group, shared.parallel) == ("linear", "shared_expert", "column")
    assert [m.name for m in shared.members] == [
        "model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.up_proj"
    ]  # fmt: skip
    assert qwen2_moe["model.layers.0.mlp.shared_expert.down_proj"].members[0].shape == (512, 512)
    gate = qwen2_moe["model.layers.0.mlp.shared_expert_gate"]
    assert (gate.kind, gate.quantizable, gate.members[0].shape) == ("router", False, (1, 512))
    assert qwen2_moe["model.layers.0.mlp.experts"].members[2].name == "model.layers.0.mlp.experts.0.down_proj"
    assert all(m.bias for m in qwen2_moe["model.layers.0.self_attn.qkv_proj"].members)
    with pytest.raises(MixedError, match="Qwen2-MoE with dense layers"):
        layers_for(dict(model_named("qwen2-moe").tiny_config, mlp_only_layers=[0]), "tiny")


@pytest.mark.parametrize(
    "arch,experts",
    [("mixtral", "model.layers.*.block_sparse_moe.experts"), ("qwen2-moe", "model.layers.*.mlp.experts")],
)
def test_tiny_moe_model_plans_and_shards_at_tp2(
    arch: str, experts: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dirs = make_tiny(tmp_path / arch, arch=arch)
    plan = build_plan(load_recipe(dirs["recipe"]))
    routed = {(p.layer.group, p.source, p.format) for p in plan.layers}
    assert ("experts", "int4", "gptq_int4") in routed and ("router", "bf16", "unquantized") in routed
    assert (("shared_expert", "int4", "gptq_int4") in routed) == (arch == "qwen2-moe")
    assert plan.unused_rules == []
    # GPTQ and FP8 keep every router (mlp.gate, shared_expert_gate, block_sparse_moe.gate) unquantized
    for source in ("int4", "fp8"):
        pure = build_plan(load_recipe(dirs["recipe"]).only(source))
        assert {p.format for p in pure.layers if p.layer.kind == "router"} == {"unquantized"}
    assert {c.status for c in plan.shard_checks(Parallel(2))} == {OK}
    assert main(["plan", str(dirs["recipe"]), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert experts in out and "AutoGPTQMoEMethod: Marlin MoE" in out


def test_qwen2_export_keeps_the_biases(tmp_path: Path) -> None:
    """``export`` writes each routed bias next to its weight, in the model dtype, equal to the source's."""
    from safetensors import safe_open

    from vllm_mixed.export import export

    dirs = make_tiny(tmp_path / "t", arch="qwen2")
    recipe = load_recipe(dirs["recipe"]).only("int4")  # GPTQ stores the biases in fp16
    out = export(build_plan(recipe), tmp_path / "exp", progress=False)
    exported = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            exported.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(".bias")})
    assert len(exported) == 3 * 2
    source = {}
    for shard in dirs["gptq-int4"].glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            source.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(".bias")})
    assert sorted(source) == sorted(exported) and {t.dtype for t in source.values()} == {torch.float16}
    for k, t in source.items():
        assert exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], t.to(torch.bfloat16)), k
