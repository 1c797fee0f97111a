"""Dense Llama-family architectures (``LlamaForCausalLM``, ``Qwen3ForCausalLM``,
``Qwen2ForCausalLM``) through the plugin on vLLM's CPU build, from
``make-tiny --arch``: pure recipes against stock vLLM on the single
checkpoint (identical teacher-forced logprobs where both run the same
kernels), and the mixes (MLP int4, rest BF16; for Qwen2 also attention FP8)
and all-FP8 against transformers' own model class on dequantized weights."""

from __future__ import annotations

import random

import pytest
import yaml

from tests.e2e.conftest import max_gap, run_vllm
from vllm_mixed.compose import compose
from vllm_mixed.cpu_kernels import cpu_fallback_reason
from vllm_mixed.formats.gptq_int4 import GPTQ_QUANT_CONFIG
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.testing.reference import agreement
from vllm_mixed.tiny import make_tiny

_rng = random.Random(7)
TEACHER = [[_rng.randrange(3, 1000) for _ in range(32)] for _ in range(3)]
REQUEST = {"teacher": TEACHER, "greedy": TEACHER[:2], "max_tokens": 12}
MLP = ["model.layers.*.mlp.gate_up_proj", "model.layers.*.mlp.down_proj"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """``make-tiny --arch NAME`` output per architecture, written once."""
    made: dict[str, object] = {}

    def root(arch: str):
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(arch)
            make_tiny(made[arch], arch=arch)
        return made[arch]

    return root


def plan_of(root, tmp_path, default, rules=()):
    data = yaml.safe_load((root / "recipe.yaml").read_text())
    data["sources"] = {k: str(root / v) for k, v in data["sources"].items()}
    data |= {"default": default, "rules": list(rules)}
    path = tmp_path / f"{default}-{len(rules)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return build_plan(load_recipe(path))


# Qwen3's q/k norms and Qwen2's q/k/v biases (fp16 in the GPTQ checkpoint) meet vLLM's own CPU int4 GEMM in their
# int4 runs
@pytest.mark.parametrize(
    "arch,source,directory",
    [("llama", "bf16", "bf16"), ("llama", "int4", "gptq-int4"), ("qwen3", "int4", "gptq-int4"),
     ("qwen2", "int4", "gptq-int4")],
)  # fmt: skip
def test_pure_recipe_equals_stock_vllm(tiny_root, tmp_path, arch, source, directory):
    root = tiny_root(arch)
    if source == "int4" and (why := cpu_fallback_reason("gptq_int4", "linear", GPTQ_QUANT_CONFIG)):
        pytest.skip(f"stock vLLM has no CPU int4 GEMM here: {why}")
    plan = plan_of(root, tmp_path, source)
    mixed = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    stock = run_vllm(root / directory, "auto", REQUEST, tmp_path / "stock")
    assert mixed["greedy"] == stock["greedy"]
    assert max_gap(mixed, stock)[0] <= 1e-5


MIX = [{"targets": MLP, "source": "int4"}]
ATTENTION_FP8 = [{"targets": ["model.layers.*.self_attn.*"], "source": "fp8"}]


# Qwen3 (the Llama layout plus q/k norms) with its MLP in int4; Qwen2 with its biased attention in FP8 (bf16
# biases beside FP8 weights), MLP int4, the rest BF16. Llama's int4 MLP runs in its pure int4 recipe against stock
# vLLM above; the FP8 linear fallback does not depend on the architecture (it also runs in the Mixtral and
# Qwen2-MoE mixes, and all-FP8 Qwen3-MoE in test_recipes_vs_reference.py)
@pytest.mark.parametrize("arch,default,rules", [("qwen3", "bf16", MIX), ("qwen2", "bf16", MIX + ATTENTION_FP8)])
def test_recipe_matches_transformers_reference(tiny_root, tmp_path, arch, default, rules):
    root = tiny_root(arch)
    plan = plan_of(root, tmp_path, default, rules)
    result = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    top1, worst = agreement(plan, TEACHER, result["teacher"])
    assert top1 >= 0.90 and worst <= 0.15, (top1, worst)
