"""The load plan on the tiny model: routing, byte counts checked against
safetensors itself, unused rules, member / layer-name / regex targets."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from vllm_mixed.cli import main
from vllm_mixed.plan import build_plan, open_sources, pure_plan
from vllm_mixed.recipe import load_recipe

EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.")


def tensor_bytes(directory: Path, keep: Any = lambda name: True) -> dict[str, int]:
    """name -> bytes of every tensor in a checkpoint, read with safe_open."""
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if keep(name):
                    t = f.get_tensor(name)
                    out[name] = t.numel() * t.element_size()
    return out


def data_bytes(directory: Path, header_len: Any) -> int:
    """Bytes of tensor data in a checkpoint: file size minus length field and header."""
    return sum(s.stat().st_size - 8 - header_len(s) for s in directory.glob("*.safetensors"))


def plan_of(recipe_path: Path):
    recipe = load_recipe(recipe_path)
    return build_plan(recipe, open_sources(recipe))


def by_layer(plan) -> dict[str, Any]:
    return {p.layer.name: p for p in plan.layers}


# --- the make-tiny recipe -------------------------------------------------------------------


def test_recipe_routes_experts_to_int4_rest_to_bf16(tiny_master: Path) -> None:
    plan = plan_of(tiny_master / "recipe.yaml")
    cfg = json.loads((tiny_master / "bf16" / "config.json").read_text())
    names = [p.layer.name for p in plan.layers]
    assert len(names) == len(set(names)) == 3 + 8 * cfg["num_hidden_layers"]
    for p in plan.layers:
        if p.layer.name.endswith(".mlp.experts"):
            assert (p.source, p.format, p.precision) == ("int4", "gptq_int4", "int4-g128"), p.layer.name
            assert all(t.file.parent == tiny_master / "gptq-int4" for t in p.tensors)
            assert {t.name.rsplit(".", 1)[1] for t in p.tensors} == {"qweight", "qzeros", "scales", "g_idx"}
            assert len(p.tensors) == 4 * 3 * cfg["num_experts"]
        else:
            assert (p.source, p.format, p.precision) == ("bf16", "unquantized", "bf16"), p.layer.name
            assert all(t.file.parent == tiny_master / "bf16" for t in p.tensors)
            assert {t.dtype for t in p.tensors} == {"BF16"}
    assert sum(p.layer.name.endswith(".mlp.experts") for p in plan.layers) == cfg["num_hidden_layers"]
    assert plan.unused_rules == []
    assert plan.routes() == {p.layer.name: p.source for p in plan.layers}


def test_bytes_equal_safetensors_sizes(tiny_master: Path) -> None:
    plan = plan_of(tiny_master / "recipe.yaml")
    bf16 = tensor_bytes(tiny_master / "bf16", lambda n: not EXPERT.match(n))
    int4 = tensor_bytes(tiny_master / "gptq-int4", lambda n: bool(EXPERT.match(n)))
    assert bf16 and int4
    # exactly those tensors, each with its real size
    planned = {(p.source, t.name): t.nbytes for p in plan.layers for t in p.tensors}
    assert planned == {**{("bf16", n): b for n, b in bf16.items()}, **{("int4", n): b for n, b in int4.items()}}
    assert plan.bytes_by_precision() == {"bf16": sum(bf16.values()), "int4-g128": sum(int4.values())}
    assert plan.total_bytes == sum(bf16.values()) + sum(int4.values())
    groups = plan.groups()
    assert sum(row[-1] for row in groups) == plan.total_bytes
    assert sum(row[-2] for row in groups) == len(plan.layers)
    experts_rows = [row for row in groups if row[0] == "experts"]
    assert experts_rows == [("experts", "int4", "gptq_int4", "int4-g128", "experts", 2, sum(int4.values()))]


@pytest.mark.parametrize("name,directory", [("bf16", "bf16"), ("fp8", "fp8"), ("int4", "gptq-int4")])
def test_pure_plan_reads_every_byte_of_its_checkpoint(
    tiny_master: Path, header_len: Any, name: str, directory: str
) -> None:
    recipe = load_recipe(tiny_master / "recipe.yaml")
    sources = open_sources(recipe)
    pure = pure_plan(recipe, sources, name)
    assert {p.source for p in pure.layers} == {name}
    assert pure.total_bytes == data_bytes(tiny_master / directory, header_len)
    assert {t.name for p in pure.layers for t in p.tensors} == set(tensor_bytes(tiny_master / directory))


def test_fp8_pure_plan_keeps_router_and_head_unquantized(tiny_master: Path) -> None:
    recipe = load_recipe(tiny_master / "recipe.yaml")
    layers = by_layer(pure_plan(recipe, open_sources(recipe), "fp8"))
    assert layers["model.layers.0.mlp.gate"].format == "unquantized"  # modules_to_not_convert
    assert layers["lm_head"].precision == "bf16"
    assert layers["model.layers.1.self_attn.qkv_proj"].precision == "fp8-block128x128"
    assert {t.dtype for t in layers["model.layers.1.mlp.experts"].tensors} == {"F8_E4M3", "BF16"}


def test_tensors_by_file_in_file_order(tiny_master: Path) -> None:
    plan = plan_of(tiny_master / "recipe.yaml")
    by_file = plan.tensors_by_file()
    assert sorted(t.name for items in by_file.values() for _, t in items) == sorted(
        t.name for p in plan.layers for t in p.tensors
    )
    for path, items in by_file.items():
        assert all(str(t.file) == path for _, t in items)
        starts = [t.start for _, t in items]
        assert starts == sorted(starts)


def test_config_only_plan_has_routes_but_no_tensors(tiny_master: Path) -> None:
    recipe = load_recipe(tiny_master / "recipe.yaml")
    full = build_plan(recipe)
    light = build_plan(recipe, read_headers=False)
    assert light.routes() == full.routes()
    assert light.total_bytes == 0 and all(p.tensors == () for p in light.layers)


# --- plan --json ----------------------------------------------------------------------------


def test_plan_json_numbers(tiny_master: Path, header_len: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(tiny_master / "recipe.yaml"), "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    bf16 = sum(tensor_bytes(tiny_master / "bf16", lambda n: not EXPERT.match(n)).values())
    int4 = sum(tensor_bytes(tiny_master / "gptq-int4", lambda n: bool(EXPERT.match(n))).values())
    assert data["bytes_by_precision"] == {"bf16": bf16, "int4-g128": int4}
    assert data["total_bytes"] == bf16 + int4
    assert sum(g["bytes"] for g in data["groups"]) == data["total_bytes"]
    assert data["pure_sources"] == {
        "bf16": data_bytes(tiny_master / "bf16", header_len),
        "fp8": data_bytes(tiny_master / "fp8", header_len),
        "int4": data_bytes(tiny_master / "gptq-int4", header_len),
    }
    assert data["unused_rules"] == []
    assert data["sources"]["int4"] == {"path": str(tiny_master / "gptq-int4"), "format": "gptq_int4"}
    assert data["recipe"]["rules"] == [{"targets": ["model.layers.*.mlp.experts"], "source": "int4"}]
    assert data["tensors"] == len(tensor_bytes(tiny_master / "bf16", lambda n: not EXPERT.match(n))) + len(
        tensor_bytes(tiny_master / "gptq-int4", lambda n: bool(EXPERT.match(n)))
    )
    assert "warning" not in err


# --- unused rules ---------------------------------------------------------------------------


def test_rule_matching_nothing_is_reported(tiny_ro: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rules = [
        {"targets": ["model.layers.*.mlp.experts"], "source": "int4"},
        {"targets": ["model.layers.99.*", "re:experts"], "source": "fp8"},
    ]
    path = tiny_ro.recipe(rules=rules)
    assert plan_of(path).unused_rules == [1]
    assert main(["plan", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "warning: rule 1 (targets ['model.layers.99.*', 're:experts'] -> fp8) matches no layer" in err
    assert "warning: rule 0" not in err
    assert main(["plan", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["unused_rules"] == [{"index": 1, "targets": rules[1]["targets"], "source": "fp8"}]


def test_rule_shadowed_by_earlier_rule_is_unused(tiny_ro: Any) -> None:
    plan = plan_of(
        tiny_ro.recipe(
            rules=[
                {"targets": ["model.layers.*.mlp.experts"], "source": "int4"},
                {"targets": ["model.layers.0.mlp.experts"], "source": "fp8"},
                {"targets": ["lm_head"], "source": "fp8"},
            ]
        )
    )
    assert plan.unused_rules == [1]
    layers = by_layer(plan)
    assert layers["model.layers.0.mlp.experts"].source == "int4"
    assert layers["lm_head"].source == "fp8"


# --- member, layer-name and regex targets ---------------------------------------------------------


def test_member_glob_covering_all_experts_of_one_layer(tiny_ro: Any) -> None:
    plan = plan_of(tiny_ro.recipe(rules=[{"targets": ["model.layers.0.mlp.experts.*"], "source": "fp8"}]))
    layers = by_layer(plan)
    e0, e1 = layers["model.layers.0.mlp.experts"], layers["model.layers.1.mlp.experts"]
    assert (e0.source, e0.format, e0.precision) == ("fp8", "fp8_block", "fp8-block128x128")
    assert {t.name.rsplit(".", 1)[1] for t in e0.tensors} == {"weight", "weight_scale_inv"}
    assert all(t.file.parent == tiny_ro.src("fp8") for t in e0.tensors)
    assert (e1.source, e1.format) == ("bf16", "unquantized")
    assert plan.unused_rules == []


def test_member_glob_q_k_v(tiny_ro: Any) -> None:
    plan = plan_of(tiny_ro.recipe(rules=[{"targets": ["model.layers.*.self_attn.[qkv]_proj"], "source": "int4"}]))
    for p in plan.layers:
        if p.layer.name.endswith("qkv_proj"):
            assert (p.source, p.format) == ("int4", "gptq_int4")
            assert {t.name.rsplit(".", 2)[1] for t in p.tensors} == {"q_proj", "k_proj", "v_proj"}
        else:
            assert p.source == "bf16", p.layer.name


def test_member_names_listed_one_by_one(tiny_ro: Any) -> None:
    targets = [f"model.layers.1.self_attn.{m}_proj" for m in "qkv"]
    layers = by_layer(plan_of(tiny_ro.recipe(rules=[{"targets": targets, "source": "fp8"}])))
    assert layers["model.layers.1.self_attn.qkv_proj"].source == "fp8"
    assert layers["model.layers.0.self_attn.qkv_proj"].source == "bf16"


def test_layer_name_targets(tiny_ro: Any) -> None:
    rules = [
        {"targets": ["model.layers.1.self_attn.o_proj"], "source": "int4"},
        {"targets": ["model.layers.0.self_attn.qkv_proj", "lm_head"], "source": "fp8"},
    ]
    plan = plan_of(tiny_ro.recipe(rules=rules))
    layers = by_layer(plan)
    assert (layers["model.layers.1.self_attn.o_proj"].source, layers["model.layers.1.self_attn.o_proj"].format) == (
        "int4",
        "gptq_int4",
    )
    assert layers["model.layers.0.self_attn.o_proj"].source == "bf16"
    assert layers["model.layers.0.self_attn.qkv_proj"].format == "fp8_block"
    assert layers["model.layers.1.self_attn.qkv_proj"].source == "bf16"
    # lm_head from the fp8 checkpoint is stored in bf16 there
    assert (layers["lm_head"].source, layers["lm_head"].format, layers["lm_head"].precision) == (
        "fp8",
        "unquantized",
        "bf16",
    )
    assert plan.unused_rules == []


def test_regex_targets(tiny_ro: Any) -> None:
    rules = [
        {"targets": [r"re:model\.layers\.[01]\.mlp\.experts"], "source": "int4"},
        {"targets": [r"re:lm_head|model\.embed_tokens"], "source": "int4"},
        {"targets": [r"re:model\.layers\.\d+\.mlp\.gate"], "source": "fp8"},
    ]
    plan = plan_of(tiny_ro.recipe(rules=rules))
    layers = by_layer(plan)
    for i in (0, 1):
        assert layers[f"model.layers.{i}.mlp.experts"].format == "gptq_int4"
        assert (layers[f"model.layers.{i}.mlp.gate"].source, layers[f"model.layers.{i}.mlp.gate"].format) == (
            "fp8",
            "unquantized",
        )
    # embeddings and head from the GPTQ checkpoint are its fp16 tensors
    for name in ("lm_head", "model.embed_tokens"):
        assert (layers[name].source, layers[name].precision) == ("int4", "fp16")
        assert {t.dtype for t in layers[name].tensors} == {"F16"}
    assert plan.unused_rules == []
    assert set(plan.bytes_by_precision()) == {"bf16", "fp16", "int4-g128"}


def test_regex_must_match_whole_layer_name(tiny_ro: Any) -> None:
    """'re:.*mlp' would match every MLP name as a search; as a full match it
    matches nothing, so the rule is unused and nothing moves."""
    plan = plan_of(tiny_ro.recipe(rules=[{"targets": ["re:.*mlp", "re:model.layers.0"], "source": "int4"}]))
    assert plan.unused_rules == [0]
    assert {p.source for p in plan.layers} == {"bf16"}


def test_default_only_recipes(tiny_ro: Any, header_len: Any) -> None:
    for name, directory in (("fp8", "fp8"), ("int4", "gptq-int4")):
        plan = plan_of(tiny_ro.recipe(default=name, rules=[]))
        assert {p.source for p in plan.layers} == {name}
        assert plan.total_bytes == data_bytes(tiny_ro.src(directory), header_len)


def test_plan_predicts_vllm_methods(tiny_ro: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan --json` names the vLLM method each group will run (the GPU run's
    load log printed the same classes: benchmarks/RESULTS.md); the CPU column
    is this machine's: vLLM's own method where its CPU build has a kernel,
    else the dequantizing fallback (all of them with VLLM_MIXED_CPU_FALLBACK=1)."""
    import contextlib
    import io

    from vllm_mixed.cli import main
    from vllm_mixed.cpu_kernels import FALLBACK_ENV, cpu_fallback_reason
    from vllm_mixed.formats.fp8_block import FP8_QUANT_CONFIG
    from vllm_mixed.formats.gptq_int4 import GPTQ_QUANT_CONFIG

    rules = [
        {"targets": ["model.layers.*.mlp.experts"], "source": "int4"},
        {"targets": ["model.layers.*.self_attn.o_proj"], "source": "fp8"},
    ]

    def predicted() -> dict[tuple[str, str], tuple[str, str]]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["plan", str(tiny_ro.recipe(rules=rules)), "--json"]) == 0
        out = json.loads(buf.getvalue())
        return {(g["group"], g["format"]): (g["vllm_method_gpu"], g["vllm_method_cpu"]) for g in out["groups"]}

    methods = predicted()
    moe_native = cpu_fallback_reason("gptq_int4", "experts", GPTQ_QUANT_CONFIG) is None
    fp8_native = cpu_fallback_reason("fp8_block", "linear", FP8_QUANT_CONFIG) is None
    assert methods[("experts", "gptq_int4")] == (
        "AutoGPTQMoEMethod", "AutoGPTQMoEMethod" if moe_native else "DequantFallbackMoEMethod"
    )  # fmt: skip
    assert methods[("attention", "fp8_block")] == (
        "Fp8LinearMethod", "Fp8LinearMethod" if fp8_native else "DequantFallbackLinearMethod"
    )  # fmt: skip
    assert methods[("attention", "unquantized")] == ("UnquantizedLinearMethod", "UnquantizedLinearMethod")
    assert methods[("router", "unquantized")][0] == "UnquantizedLinearMethod"
    assert methods[("embed_tokens", "unquantized")] == ("-", "-")
    monkeypatch.setenv(FALLBACK_ENV, "1")
    forced = predicted()
    assert forced[("experts", "gptq_int4")][1] == "DequantFallbackMoEMethod"
    assert forced[("attention", "fp8_block")][1] == "DequantFallbackLinearMethod"
