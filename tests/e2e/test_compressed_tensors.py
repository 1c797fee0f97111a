"""compressed-tensors checkpoints as sources, on vLLM's CPU build (tiny
models from ``make-tiny --formats ct-w4a16,ct-fp8``):

- the tiny Llama with attention from CT FP8 per-channel with dynamic
  per-token activations (vLLM's ``ChannelWiseTorchFP8ScaledMMLinearKernel``)
  and the MLP from CT W4A16 (int4 linears on vLLM's ``CPUWNA16LinearKernel``)
  against stock vLLM on the recipe's export (one checkpoint, both schemes):
  the same kernels, so identical teacher-forced logprobs; the load logs name
  the methods (two vLLM runs instead of four for the two pure recipes);
- the tiny Qwen3-MoE mix (experts CT W4A16 asymmetric, attention CT FP8
  per-tensor with static activations, the rest BF16) on the dequantizing fallback (its CT parameter layouts) against
  transformers' own model on the dequantized weights. Stock vLLM's
  CPU build refuses CT MoE checkpoints here (no int4 / FP8 MoE experts
  without AMX): their stock comparison is ``benchmarks/gpu_oracle_ct.py``.
"""

from __future__ import annotations

import random

import pytest
import yaml

from tests.e2e.conftest import max_gap, run_vllm
from vllm_mixed.compose import compose
from vllm_mixed.cpu_kernels import FALLBACK_ENV, cpu_fallback_reason
from vllm_mixed.export import export
from vllm_mixed.formats import UNQUANTIZED
from vllm_mixed.formats.ct_fp8 import CT_FP8, fp8_config
from vllm_mixed.formats.ct_w4a16 import CT_W4A16, w4a16_config
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.testing.reference import agreement
from vllm_mixed.tiny import make_tiny

_rng = random.Random(12)
TEACHER = [[_rng.randrange(3, 1000) for _ in range(32)] for _ in range(3)]
REQUEST = {"teacher": TEACHER, "greedy": TEACHER[:2], "max_tokens": 12}
FORMATS = (CT_W4A16, CT_FP8)


def recipe(root, tmp_path, default, rules=(), kernels=None):
    sources = {"bf16": str(root / "bf16")} | {f.tiny.source: str(root / f.tiny.directory) for f in FORMATS}
    body = {"sources": sources, "base": "bf16", "default": default, "dtype": "bfloat16", "rules": list(rules)}
    if kernels:
        body["kernels"] = kernels
    path = tmp_path / f"{default}-{len(rules)}-{len(kernels or {})}.yaml"
    path.write_text(yaml.safe_dump(body))
    return build_plan(load_recipe(path))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-llama")
    make_tiny(root, arch="llama", formats=(UNQUANTIZED, *FORMATS))
    return root


MLP = ["model.layers.*.mlp.gate_up_proj", "model.layers.*.mlp.down_proj"]
ATTENTION = ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"]


def test_ct_recipe_equals_stock_vllm_on_its_export(llama, tmp_path):
    """Attention from the CT FP8 checkpoint (per-channel, dynamic per-token:
    vLLM's ChannelWiseTorchFP8ScaledMMLinearKernel), MLP from the CT W4A16
    one (vLLM's CPUWNA16LinearKernel), the rest BF16; stock vLLM serves the
    recipe's export (one compressed-tensors checkpoint with both schemes,
    the CT tensors copied bit for bit) on the same kernels."""
    for fmt in FORMATS:
        if why := cpu_fallback_reason(fmt.name, "linear", fmt.tiny.quant_config):
            pytest.skip(f"stock vLLM has no CPU kernel for {fmt.name} linears here: {why}")
    rules = [{"targets": ATTENTION, "source": CT_FP8.tiny.source}, {"targets": MLP, "source": CT_W4A16.tiny.source}]
    plan = recipe(llama, tmp_path, "bf16", rules)
    exported = export(plan, tmp_path / "export", shard_bytes=2**20, progress=False)
    mixed = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    stock = run_vllm(exported, "auto", REQUEST, tmp_path / "stock")
    assert "qkv_proj <- source 'ctfp8' (ct_fp8) via CompressedTensorsLinearMethod" in mixed["log"]
    assert "gate_up_proj <- source 'ctint4' (ct_w4a16) via CompressedTensorsLinearMethod" in mixed["log"]
    for kernel in ("ChannelWiseTorchFP8ScaledMMLinearKernel", "CPUWNA16LinearKernel"):
        assert kernel in mixed["log"] and kernel in stock["log"], kernel
    assert mixed["greedy"] == stock["greedy"]
    assert max_gap(mixed, stock)[0] <= 1e-5


def test_recipe_linear_backend_applies_to_its_source_only(llama, tmp_path):
    """``kernels: {ctfp8: {linear_backend: torch}}``: vLLM's ``torch`` linear
    backend for the FP8 attention only, while the W4A16 MLP keeps vLLM's own
    choice (``CPUWNA16LinearKernel`` belongs to no backend name, so a global
    ``--linear-backend torch`` would leave it without a kernel). On this CPU
    the FP8 kernel is the same either way: logprobs identical to the recipe
    without the key."""
    for fmt in FORMATS:
        if why := cpu_fallback_reason(fmt.name, "linear", fmt.tiny.quant_config):
            pytest.skip(f"stock vLLM has no CPU kernel for {fmt.name} linears here: {why}")
    rules = [{"targets": ATTENTION, "source": CT_FP8.tiny.source}, {"targets": MLP, "source": CT_W4A16.tiny.source}]
    fp8, int4 = CT_FP8.tiny.source, CT_W4A16.tiny.source
    plain = run_vllm(compose(recipe(llama, tmp_path, "bf16", rules), tmp_path / "plain"), "mixed", REQUEST,
                     tmp_path / "run-plain")  # fmt: skip
    chosen_plan = recipe(llama, tmp_path, "bf16", rules, {fp8: {"linear_backend": "torch"}})
    chosen = run_vllm(compose(chosen_plan, tmp_path / "chosen"), "mixed", REQUEST, tmp_path / "run-chosen")
    lines = [line for line in chosen["log"].splitlines() if "vllm-mixed: " in line and " <- source " in line]
    marked = f"[linear backend asked: torch (recipe: kernels.{fp8}.linear_backend)]"
    assert any(f"qkv_proj <- source '{fp8}'" in line and marked in line for line in lines), lines
    assert any(f"gate_up_proj <- source '{int4}'" in line and "[linear backend" not in line for line in lines), lines
    assert "CPUWNA16LinearKernel" in chosen["log"]
    assert chosen["greedy"] == plain["greedy"] and max_gap(chosen, plain)[0] == 0.0
    # vLLM 0.32 answers a backend with no kernel for a layer with a warning and its own choice (0.26 raises,
    # and the plugin names the recipe key): the int4 MLP stays on CPUWNA16LinearKernel, results unchanged
    unmet_plan = recipe(llama, tmp_path, "bf16", rules, {int4: {"linear_backend": "torch"}})
    unmet = run_vllm(compose(unmet_plan, tmp_path / "unmet"), "mixed", REQUEST, tmp_path / "run-unmet")
    assert "--linear-backend=torch has no kernel for this linear layer type" in unmet["log"]
    assert "CPUWNA16LinearKernel" in unmet["log"] and max_gap(unmet, plain)[0] == 0.0


def write_variant(root, fmt, directory, quant_config):
    """The tiny model's master weights (make-tiny's seed) as a checkpoint of
    ``fmt`` with another published ``quantization_config``."""
    from vllm_mixed.checkpoint_writer import write_checkpoint
    from vllm_mixed.tiny import TINY_CONFIG, checkpoint_config, checkpoint_tensors, master_weights

    class Variant(type(fmt)):
        tiny = type(fmt.tiny)(directory, quant_config, fmt.tiny.float_dtype, directory)

    cfg = dict(TINY_CONFIG)
    variant = Variant()
    write_checkpoint(root / directory, checkpoint_tensors(cfg, master_weights(cfg, 0), variant),
                     checkpoint_config(cfg, variant), 2 * 2**20)  # fmt: skip
    return str(root / directory)


def test_ct_mix_matches_transformers_reference(tmp_path_factory, tmp_path):
    """Experts CT W4A16 asymmetric group 64 (zero points), attention CT FP8
    per-tensor with static input scales (one scale per fused member), the
    rest BF16, all on the dequantizing fallback (its CT parameter layouts and
    vLLM's weight loaders)."""
    root = tmp_path_factory.mktemp("ct-moe")
    make_tiny(root, formats=(UNQUANTIZED,))
    sources = {"bf16": str(root / "bf16"),
               "w4asym": write_variant(root, CT_W4A16, "ct-w4a16-asym", w4a16_config(64, symmetric=False)),
               "f8static": write_variant(root, CT_FP8, "ct-fp8-static", fp8_config("tensor", "static"))}  # fmt: skip
    rules = [{"targets": ["model.layers.*.mlp.experts"], "source": "w4asym"},
             {"targets": ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"],
              "source": "f8static"}]  # fmt: skip
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"sources": sources, "base": "bf16", "default": "bf16", "dtype": "bfloat16",
                                    "rules": rules}))  # fmt: skip
    plan = build_plan(load_recipe(path))
    assert {p.precision for p in plan.layers if p.layer.quantizable} == {"int4-g64-asym", "fp8-tensor-static"}
    # the fallback everywhere: a weight-only path, as the reference is (vLLM's native FP8 GEMM also
    # quantizes activations; it is compared with stock vLLM above)
    env = {FALLBACK_ENV: "1"}
    result = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed", env=env)
    assert "experts <- source 'w4asym' (ct_w4a16) via DequantFallbackMoEMethod" in result["log"]
    assert "qkv_proj <- source 'f8static' (ct_fp8) via DequantFallbackLinearMethod" in result["log"]
    top1, worst = agreement(plan, TEACHER, result["teacher"])
    assert top1 >= 0.90 and worst <= 0.15, (top1, worst)
