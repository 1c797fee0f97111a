"""MoE architectures beyond Qwen3-MoE (``MixtralForCausalLM``: experts
``block_sparse_moe.experts.E.w1/w2/w3``; ``Qwen2MoeForCausalLM``: routed
experts, a shared expert and its gate) through the plugin on vLLM's CPU
build, from ``make-tiny --arch``: the pure BF16 recipe against stock vLLM on
the BF16 checkpoint (the same kernels: identical teacher-forced logprobs;
stock vLLM has no int4 or FP8 MoE kernel on a CPU without AMX), and one mix
per architecture and direction (experts int4 with attention FP8, and experts
FP8 with attention int4; the rest BF16) against transformers' own model class
on dequantized weights. Qwen2-MoE's int4 attention and shared expert meet
stock vLLM too, on a GPTQ checkpoint whose experts GPTQModel's ``dynamic``
rule leaves unquantized."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.e2e.conftest import max_gap, routed_line, run_vllm
from tests.e2e.test_dense_models import REQUEST, TEACHER, plan_of, tiny_root  # noqa: F401 (a fixture)
from vllm_mixed.checkpoint_writer import write_checkpoint
from vllm_mixed.compose import compose
from vllm_mixed.cpu_kernels import cpu_fallback_reason
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.testing.reference import agreement
from vllm_mixed.tiny import write_tokenizer

ATTENTION = ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"]
EXPERTS = {
    "mixtral": ["model.layers.*.block_sparse_moe.experts"],
    "qwen2-moe": ["model.layers.*.mlp.experts", "model.layers.*.mlp.shared_expert.*"],
}
# (experts' source, attention's source): int4 experts beside FP8 attention, and the other way round
# (experts on vLLM's CPU MoE kernels with AMX, else on the fallback; int4 attention on vLLM's CPU int4 GEMM)
MIXES = {"int4-experts": ("int4", "fp8"), "fp8-experts": ("fp8", "int4")}


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe"])
def test_pure_bf16_equals_stock_vllm(tiny_root, tmp_path, arch):  # noqa: F811
    root = tiny_root(arch)
    plan = plan_of(root, tmp_path, "bf16")
    mixed = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    stock = run_vllm(root / "bf16", "auto", REQUEST, tmp_path / "stock")
    assert mixed["greedy"] == stock["greedy"]
    assert max_gap(mixed, stock)[0] <= 1e-5


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe"])
def test_mix_matches_transformers_reference(tiny_root, tmp_path, arch, mix):  # noqa: F811
    root = tiny_root(arch)
    experts, attention = MIXES[mix]
    rules = [{"targets": EXPERTS[arch], "source": experts}, {"targets": ATTENTION, "source": attention}]
    plan = plan_of(root, tmp_path, "bf16", rules)
    assert {p.format for p in plan.layers if p.layer.kind in ("experts", "linear")} == {"gptq_int4", "fp8_block"}
    result = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    assert routed_line(plan, "experts") in result["log"]
    top1, worst = agreement(plan, TEACHER, result["teacher"])
    assert top1 >= 0.90 and worst <= 0.15, (top1, worst)


def test_qwen2_moe_int4_attention_and_shared_expert_equal_stock_vllm(tiny_root, tmp_path):  # noqa: F811
    """Everything int4 but the routed experts (BF16): q/k/v with fp16 biases,
    o_proj and the shared expert on vLLM's CPU int4 GEMM, both gates fp16. The
    oracle is stock vLLM on the GPTQ checkpoint with BF16 experts and
    ``dynamic: {"-:...experts...": {}}`` (GPTQModel's rule for modules it left
    unquantized, which vLLM's GPTQ config honours); the plugin reads that
    checkpoint as a source (its experts in float) beside the BF16 one: the
    same kernels and weights, so identical logprobs. (On the H200 the all-int4 pair, experts on Humming,
    differs from stock by up to 0.0079: ``benchmarks/RESULTS.md``.)"""
    root = tiny_root("qwen2-moe")

    def tensors(d):
        return {k: v for f in sorted((root / d).glob("*.safetensors")) for k, v in load_file(f).items()}

    experts = ".mlp.experts."
    hybrid = {k: v for k, v in tensors("gptq-int4").items() if experts not in k}
    hybrid |= {k: v for k, v in tensors("bf16").items() if experts in k}
    cfg = json.loads((root / "gptq-int4" / "config.json").read_text())
    if why := cpu_fallback_reason("gptq_int4", "linear", cfg["quantization_config"]):  # both sides need it
        pytest.skip(f"vLLM's CPU build has no gptq_int4 linear kernel on this CPU: {why}")
    cfg["quantization_config"]["dynamic"] = {r"-:.*mlp\.experts.*": {}}
    write_checkpoint(tmp_path / "stock-ckpt", hybrid, cfg, 2 * 2**20)
    write_tokenizer(tmp_path / "stock-ckpt")
    # the plugin: layer 0's experts from the BF16 checkpoint, the rest from this GPTQ one (its dynamic rule read:
    # layer 1's experts come from it in float)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"sources: {{gptq: {tmp_path / 'stock-ckpt'}, bf16: {root / 'bf16'}}}\nbase: bf16\ndefault: gptq\n"
        "dtype: bfloat16\nrules: [{targets: [model.layers.0.mlp.experts], source: bf16}]\n"
    )
    plan = build_plan(load_recipe(recipe))
    routed = {(p.layer.name.split(".mlp.")[-1] if ".mlp." in p.layer.name else p.layer.group, p.source, p.format)
              for p in plan.layers if p.layer.kind in ("experts", "linear")}  # fmt: skip
    assert routed == {("experts", "bf16", "unquantized"), ("experts", "gptq", "unquantized"),
                      ("attention", "gptq", "gptq_int4"), ("shared_expert.gate_up_proj", "gptq", "gptq_int4"),
                      ("shared_expert.down_proj", "gptq", "gptq_int4")}  # fmt: skip
    mixed = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    stock = run_vllm(tmp_path / "stock-ckpt", "auto", REQUEST, tmp_path / "stock")
    for log in (mixed["log"], stock["log"]):
        assert "Using CPUWNA16LinearKernel for AutoGPTQLinearMethod" in log
    assert mixed["greedy"] == stock["greedy"]
    assert max_gap(mixed, stock)[0] == 0.0
