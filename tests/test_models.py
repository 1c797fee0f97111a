"""The architecture registry: each architecture's layer table (vLLM layer
names, fused members, shapes, parallel style), geometry and tiny model, and
the refusal of architectures that are not registered."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_mixed.cli import main
from vllm_mixed.errors import MixedError
from vllm_mixed.models import MODELS, geometry_for, layers_for, model_named
from vllm_mixed.parallel import OK, Parallel
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.tiny import make_tiny


def test_registry_names_and_refusal() -> None:
    assert {"Qwen3MoeForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"} <= set(MODELS)
    with pytest.raises(MixedError) as err:
        layers_for({"architectures": ["GPT2LMHeadModel"]}, "base 'x'")
    msg = str(err.value)
    assert msg.startswith("base 'x': architectures ['GPT2LMHeadModel'] are not supported; supported: ")
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM" in msg
    with pytest.raises(MixedError, match="--arch 'gpt2' is not a supported architecture; supported: llama, qwen3"):
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
