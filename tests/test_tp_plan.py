"""``plan --tp N``: each layer group's tensor-parallel shard against the
kernel vLLM 0.26 (CUDA) picks, at Qwen3-30B-A3B's real shape (header-true
sparse checkpoints, the shipped mix A / mix B recipes) and on the tiny model
that the GPU tests run at TP 2."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from vllm_mixed.cli import main
from vllm_mixed.errors import MixedError
from vllm_mixed.models import Layer, Member, geometry_for
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.testing.full_shape import write_sparse_checkpoint
from vllm_mixed.testing.published import published_config
from vllm_mixed.tp_constraints import FAILS, FALLBACK, OK, Parallel, Routed, check_layers, raise_on_failures

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QWEN = published_config("qwen3-30b-a3b")
QWEN_SHAPE = geometry_for(QWEN, "Qwen3-30B-A3B")
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
EXPERTS = "model.layers.*.mlp.experts"
ATTENTION = ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qwen3-30b-a3b")
    for name in ("bf16", "fp8", "gptq-int4"):
        write_sparse_checkpoint(root, name)
    return root


def shipped(full: Path, tmp_path: Path, name: str, **rule_sources: str) -> Path:
    """A configs/ recipe pointed at the sparse checkpoints; ``rule_sources``
    re-routes rules by their first target (``experts="fp8"``)."""
    data = yaml.safe_load((CONFIGS / f"qwen3-30b-a3b-mix-{name}.yaml").read_text())
    dirs = {"bf16": "bf16", "fp8": "fp8", "int4": "gptq-int4"}
    data["sources"] = {n: str(full / d) for n, d in dirs.items()}
    for rule in data["rules"]:
        short = rule["targets"][0].split(".")[-1]
        rule["source"] = rule_sources.get(short, rule["source"])
    path = tmp_path / f"mix-{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def checks_of(recipe: Path, parallel: Parallel) -> dict[tuple[str, str], Any]:
    plan = build_plan(load_recipe(recipe), read_headers=False)
    return {(c.group, c.layer): c for c in plan.shard_checks(parallel)}


# --- the rules at Qwen3-30B-A3B's shape --------------------------------------------------


def test_int4_experts_marlin_at_tp1_tp2_wna16_at_tp4_tp8(full: Path, tmp_path: Path) -> None:
    recipe = shipped(full, tmp_path, "a")
    expected = {
        1: (OK, "AutoGPTQMoEMethod: Marlin MoE", 768),
        2: (OK, "AutoGPTQMoEMethod: Marlin MoE", 384),
        4: (FALLBACK, "MoeWNA16Method (Triton, group 64)", 192),  # 192 % 128 != 0
        8: (FALLBACK, "MoeWNA16Method (Triton, group 32)", 96),  # WNA16 regroups 128 -> 32
    }
    for tp, (status, kernel, inter) in expected.items():
        checks = checks_of(recipe, Parallel(tp))
        experts = checks[("experts", EXPERTS)]
        assert (experts.status, experts.kernel) == (status, kernel), tp
        assert f"gate/up [2048 -> {inter}], down [{inter} -> 2048]" in experts.shard
        assert experts.layers == 48 and experts.format == "gptq_int4"
        if status == FALLBACK:
            assert "check_moe_marlin_supports_layer" in experts.reason and f"{inter} % 128" in experts.reason
        assert all(c.status == OK for k, c in checks.items() if k[0] != "experts"), tp
    # with expert parallelism every rank holds whole experts: Marlin again
    experts = checks_of(recipe, Parallel(4, ep=True))[("experts", EXPERTS)]
    assert (experts.status, experts.kernel) == (OK, "AutoGPTQMoEMethod: Marlin MoE")
    assert experts.shard.startswith("32 of 128 experts") and "[2048 -> 768]" in experts.shard


def test_fp8_attention_shards_and_kv_replication(full: Path, tmp_path: Path) -> None:
    recipe = shipped(full, tmp_path, "b")
    shards = {
        1: ("[2048 -> 4096+512+512]", "[4096 -> 2048]"),
        2: ("[2048 -> 2048+256+256]", "[2048 -> 2048]"),
        4: ("[2048 -> 1024+128+128]", "[1024 -> 2048]"),
        8: ("[2048 -> 512+128+128] (KV heads replicated x2)", "[512 -> 2048]"),
    }
    for tp, (qkv, o) in shards.items():
        checks = checks_of(recipe, Parallel(tp))
        assert checks[("attention", ATTENTION[0])].shard == qkv
        assert checks[("attention", ATTENTION[1])].shard == o
        for name in ATTENTION:
            c = checks[("attention", name)]
            assert (c.format, c.kernel, c.status) == ("fp8_block", "Fp8LinearMethod (block FP8 GEMM)", OK)
    # 16 ranks: 2 q heads (256) and one KV head (128) each, still whole 128-blocks
    c = checks_of(recipe, Parallel(16))[("attention", ATTENTION[0])]
    assert (c.status, c.shard) == (OK, "[2048 -> 256+128+128] (KV heads replicated x4)")


def test_int4_linear_kernels(full: Path, tmp_path: Path) -> None:
    recipe = shipped(full, tmp_path, "b", qkv_proj="int4")
    for tp in (1, 2, 4, 8):
        for name in ATTENTION:
            c = checks_of(recipe, Parallel(tp))[("attention", name)]
            assert (c.kernel, c.status) == ("AutoGPTQLinearMethod: Machete", OK), (tp, name)
    # off Hopper Machete is not in the running; Marlin takes the shard
    layer = Layer("model.layers.0.self_attn.o_proj", "linear", "attention", (Member("o", (2048, 4096)),), "row")
    (c,) = check_layers(QWEN_SHAPE, [Routed(layer, "int4", "gptq_int4", GPTQ)], Parallel(4), capability=80)
    assert (c.kernel, c.status) == ("AutoGPTQLinearMethod: Marlin", OK)
    # a quant group straddling two ranks: Machete would take [192 -> 2048], but
    # the GPTQ method allocates 192 // 128 scale rows, so it is refused
    odd = dict(QWEN, num_attention_heads=24, num_key_value_heads=8, head_dim=64)  # o_proj in 1536 -> 192 per rank
    odd_layer = Layer("model.layers.0.self_attn.o_proj", "linear", "attention", (Member("o", (2048, 1536)),), "row")
    (c,) = check_layers(geometry_for(odd, "odd"), [Routed(odd_layer, "int4", "gptq_int4", GPTQ)], Parallel(8))
    assert (c.status, c.shard) == (FAILS, "[192 -> 2048]")
    assert "192 is not a whole number of quant groups of 128" in c.reason
    assert "use tensor_parallel_size 4" in c.fixes[0]


def test_fp8_experts_at_tp4_are_refused_and_fixed_by_ep(full: Path, tmp_path: Path) -> None:
    recipe = shipped(full, tmp_path, "b", experts="fp8")
    assert checks_of(recipe, Parallel(2))[("experts", EXPERTS)].status == OK  # 384 = 3 blocks
    plan = build_plan(load_recipe(recipe), read_headers=False)
    checks = plan.shard_checks(Parallel(4))
    experts = next(c for c in checks if c.group == "experts")
    assert (experts.status, experts.kernel) == (FAILS, "Fp8MoEMethod")
    assert "192 is not a multiple of FP8 block_n 128" in experts.reason
    with pytest.raises(MixedError) as err:
        raise_on_failures(checks, Parallel(4))
    msg = str(err.value)
    assert msg.startswith("at tensor_parallel_size 4, vLLM 0.26 (CUDA) rejects this recipe: layer group 'experts'")
    assert "gate/up [2048 -> 192], down [192 -> 2048]" in msg and "Fp8MoEMethod.create_weights" in msg
    assert "use tensor_parallel_size 2" in msg
    assert "enable expert parallelism (vLLM --enable-expert-parallel" in msg
    assert f"route '{EXPERTS}' to source 'int4' (gptq_int4: MoeWNA16Method" in msg
    ep = {c.group: c for c in plan.shard_checks(Parallel(4, ep=True))}
    assert ep["experts"].status == OK and "[2048 -> 768]" in ep["experts"].shard
    raise_on_failures(plan.shard_checks(Parallel(4, ep=True)), Parallel(4, ep=True))
    # TP 8 (96 per rank) fails the same way; TP 3 fails on the attention heads first
    assert checks_of(recipe, Parallel(8))[("experts", EXPERTS)].status == FAILS
    three = checks_of(recipe, Parallel(3))
    assert "32 attention heads are not divisible by 3 ranks" in three[("attention", ATTENTION[0])].reason


def test_data_parallel_without_ep_shards_experts_over_all_ranks() -> None:
    layer = Layer("model.layers.0.mlp.experts", "experts", "experts", (), "experts")
    (c,) = check_layers(QWEN_SHAPE, [Routed(layer, "int4", "gptq_int4", GPTQ)], Parallel(2, dp=2))
    assert c.status == FALLBACK and "[2048 -> 192]" in c.shard
    (c,) = check_layers(QWEN_SHAPE, [Routed(layer, "int4", "gptq_int4", GPTQ)], Parallel(2, ep=True, dp=2))
    assert c.status == OK and c.shard.startswith("32 of 128 experts")


# --- the command -------------------------------------------------------------------------


def test_cli_exit_status_and_message(full: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = shipped(full, tmp_path, "b", experts="fp8")
    assert main(["plan", str(recipe), "--tp", "4"]) == 2
    out, err = capsys.readouterr()
    assert "per-rank shards at tensor_parallel_size 4" in out
    assert "FAILS: intermediate_size_per_partition 192 is not a multiple of FP8 block_n 128" in out
    assert err.startswith("vllm-mixed: error: at tensor_parallel_size 4, vLLM 0.26 (CUDA) rejects this recipe")
    assert "layer group 'experts'" in err and "--enable-expert-parallel" in err and "Traceback" not in err
    assert main(["plan", str(recipe), "--tp", "4", "--enable-expert-parallel"]) == 0
    assert "expert parallel" in capsys.readouterr().out
    assert main(["plan", str(recipe), "--json", "--tp", "4", "--ep"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parallel"] == {"tensor_parallel_size": 4, "expert_parallel": True}
    assert {s["group"]: s["verdict"] for s in data["shards"]}["experts"] == "ok"
    mix_a = shipped(full, tmp_path, "a")
    assert main(["plan", str(mix_a), "--tp", "4"]) == 0
    out = capsys.readouterr().out
    assert "fallback to MoeWNA16Method (Triton, group 64)" in out and "note: experts" in out
    note = next(line for line in out.splitlines() if line.startswith("note: experts"))
    # the measured cost of the fallback, and the layouts that keep Marlin
    assert "44 % less output throughput than Marlin" in note
    assert "--enable-expert-parallel" in note and "Marlin MoE" in note and "use tensor_parallel_size 2" in note
    assert main(["plan", str(mix_a), "--tp", "4", "--ep"]) == 0
    assert "note: experts" not in capsys.readouterr().out  # whole experts per rank: Marlin, no fallback


def test_tiny_model_is_accepted_at_tp2(tiny_ro: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU tests run the tiny model at TP 2 in every format: every shard
    must take vLLM's preferred kernel, no fallback."""
    for route in ("int4", "fp8", "bf16"):
        rules = [{"targets": [EXPERTS, *ATTENTION], "source": route}]
        recipe = tiny_ro.recipe(rules=rules)
        checks = build_plan(load_recipe(recipe)).shard_checks(Parallel(2))
        assert {c.status for c in checks} == {OK}, [(c.layer, c.verdict) for c in checks]
    assert main(["plan", str(tiny_ro.recipe()), "--tp", "2"]) == 0
    assert "Marlin MoE" in capsys.readouterr().out


# --- the engine runs the same check before allocating weights ------------------------------


def test_engine_refuses_before_any_weight(full: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from vllm_mixed import config as config_mod
    from vllm_mixed.composition import Composition

    recipe = load_recipe(shipped(full, tmp_path, "b", experts="fp8"))
    mixed = config_mod.MixedPrecisionConfig(Composition.from_plan(build_plan(recipe, read_headers=False)))
    mixed.check_shards(Parallel(2), "bfloat16", 90)  # accepted
    with pytest.raises(MixedError, match="at tensor_parallel_size 4, .*layer group 'experts'.*expert parallelism"):
        mixed.check_shards(Parallel(4), "bfloat16", 90)
    # get_quant_method runs it on its first call (embed_tokens, before any weight),
    # reading the layout from vLLM's current config (the model's shape from the composition)
    import vllm.config

    engine = SimpleNamespace(
        model_config=SimpleNamespace(dtype=torch.bfloat16), load_config=SimpleNamespace(load_format="mixed"),
        parallel_config=SimpleNamespace(tensor_parallel_size=4, enable_expert_parallel=False, data_parallel_size=1),
    )  # fmt: skip
    monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda: engine)
    monkeypatch.setattr(config_mod, "is_cpu", lambda: False)
    fresh = config_mod.MixedPrecisionConfig(mixed.composition)
    with pytest.raises(MixedError, match="Fp8MoEMethod.create_weights"):
        fresh.get_quant_method(torch.nn.Module(), "model.embed_tokens")
    engine.parallel_config.enable_expert_parallel = True
    fresh = config_mod.MixedPrecisionConfig(mixed.composition)
    assert fresh.get_quant_method(torch.nn.Module(), "model.embed_tokens") is None
