"""AWQ, act-order GPTQ, channelwise GPTQ and 8-bit GPTQ sources through the
plugin on vLLM's CPU build (eight vLLM runs):

- the pure AWQ recipe of the tiny Llama against stock vLLM on the AWQ
  checkpoint: both run vLLM's AutoAWQMarlinLinearMethod on the CPU int4 GEMM
  with zero points (CPUWNA16LinearKernel), so the teacher-forced logprobs are
  identical. Stock vLLM cannot run the tiny Qwen3-MoE AWQ checkpoint on this
  CPU (no int4 MoE kernel without AMX: "No WNA16 MoE backend"); that pair is
  in ``benchmarks/gpu_oracle.py --variants`` for the H200;
- a mix on the tiny Qwen3-MoE (experts AWQ, q/k/v act-order GPTQ, o_proj
  8-bit GPTQ, the rest BF16) against the float32 transformers reference on
  the dequantized weights. vLLM's CPU build has no kernel for any of the
  three here (AWQ experts need AMX, act-order is refused by vLLM >= 0.27,
  CPUWNA16 is 4-bit only): all run on the dequantizing fallback, whose
  act-order linears load their ``g_idx``;
- channelwise act-order GPTQ (``group_size: -1, desc_act: true``, as
  TheBloke's main-branch Mixtral checkpoint declares it): the pure recipe of
  the tiny Llama against stock vLLM (both on the CPU int4 GEMM, which vLLM
  runs as desc_act false: one group has no column order), and the tiny
  Mixtral's experts from it against the float reference (fallback);
- act-order experts (``desc_act: true`` with groups, as TheBloke's
  ``gptq-4bit-32g-actorder_True``-style branches): the tiny Mixtral's
  experts against the float reference and, exactly, against stock vLLM on a
  BF16 checkpoint of the reference decoder's weights, on the fallback, which
  loads each expert's ``g_idx`` itself (vLLM >= 0.27's expert loader has no case for
  it; its CUDA build runs them on Marlin MoE, ``gpu_oracle.py --variants``)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.e2e.conftest import max_gap, routed_line, run_vllm
from vllm_mixed.checkpoint_writer import write_checkpoint
from vllm_mixed.compose import compose
from vllm_mixed.cpu_kernels import cpu_fallback_reason
from vllm_mixed.formats import UNQUANTIZED
from vllm_mixed.formats.awq import AWQ, AWQ_QUANT_CONFIG
from vllm_mixed.formats.gptq_int8 import GPTQ_INT8
from vllm_mixed.formats.gptq_variants import act_order_tiny, channelwise_tiny
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.testing.reference import agreement
from vllm_mixed.tiny import make_tiny, write_tokenizer

_rng = random.Random(12)
TEACHER = [[_rng.randrange(3, 1000) for _ in range(32)] for _ in range(3)]
REQUEST = {"teacher": TEACHER, "greedy": TEACHER[:2], "max_tokens": 12}


def recipe(root, tmp_path, name, sources, default, rules=()):
    body = {"sources": {s: str(root / d) for s, d in sources.items()}, "base": "bf16", "default": default,
            "dtype": "bfloat16", "rules": list(rules)}  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return build_plan(load_recipe(path))


def test_pure_awq_llama_equals_stock_vllm(tmp_path):
    if why := cpu_fallback_reason("awq", "linear", AWQ_QUANT_CONFIG):
        pytest.skip(f"stock vLLM has no CPU int4 GEMM with zero points here: {why}")
    root = tmp_path / "llama"
    make_tiny(root, arch="llama", formats=(UNQUANTIZED, AWQ))
    plan = recipe(root, tmp_path, "all-awq", {"bf16": "bf16", "awq": "awq"}, "awq")
    mixed = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    stock = run_vllm(root / "awq", "auto", REQUEST, tmp_path / "stock")
    assert "qkv_proj <- source 'awq' (awq) via AutoAWQMarlinLinearMethod" in mixed["log"]
    assert "Using CPUWNA16LinearKernel for AutoAWQMarlinLinearMethod" in mixed["log"]
    assert "Using CPUWNA16LinearKernel for AutoAWQMarlinLinearMethod" in stock["log"]
    gap, same_top1 = max_gap(mixed, stock)
    assert same_top1 and gap <= 1e-5, gap
    assert mixed["greedy"] == stock["greedy"]


MIX = [
    {"targets": ["model.layers.*.mlp.experts"], "source": "awq"},
    {"targets": ["model.layers.*.self_attn.qkv_proj"], "source": "int4a"},
    {"targets": ["model.layers.*.self_attn.o_proj"], "source": "int8"},
]


def test_awq_actorder_int8_mix_matches_reference(tmp_path):
    root = tmp_path / "moe"
    make_tiny(root, formats=(UNQUANTIZED, AWQ, act_order_tiny(), GPTQ_INT8))
    sources = {"bf16": "bf16", "awq": "awq", "int4a": "gptq-int4-actorder", "int8": "gptq-int8"}
    plan = recipe(root, tmp_path, "mix", sources, "bf16", MIX)
    assert {p.precision for p in plan.layers if p.layer.kind in ("linear", "experts")} == {
        "awq-int4-g128", "int4-g128-actorder", "int8-g128",
    }  # fmt: skip
    result = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    log = result["log"]
    assert routed_line(plan, "experts") in log  # AutoAWQMoEMethod with AMX, else the fallback
    assert "qkv_proj <- source 'int4a' (gptq_int4) via DequantFallbackLinearMethod" in log
    assert "o_proj <- source 'int8' (gptq_int8) via DequantFallbackLinearMethod" in log
    top1, worst = agreement(plan, TEACHER, result["teacher"])
    assert top1 >= 0.90 and worst <= 0.15, (top1, worst)


def test_pure_channelwise_gptq_llama_equals_stock_vllm(tmp_path):
    fmt = channelwise_tiny()
    if why := cpu_fallback_reason("gptq_int4", "linear", fmt.tiny.quant_config):
        pytest.skip(f"stock vLLM has no CPU int4 GEMM for channelwise GPTQ here: {why}")
    root = tmp_path / "llama"
    make_tiny(root, arch="llama", formats=(UNQUANTIZED, fmt))
    plan = recipe(root, tmp_path, "all-int4c", {"bf16": "bf16", "int4c": "gptq-int4-channel"}, "int4c")
    assert {p.precision for p in plan.layers if p.layer.kind == "linear"} == {"int4-channel"}
    mixed = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    stock = run_vllm(root / "gptq-int4-channel", "auto", REQUEST, tmp_path / "stock")
    assert "qkv_proj <- source 'int4c' (gptq_int4) via AutoGPTQLinearMethod" in mixed["log"]
    for result in (mixed, stock):
        assert "Using CPUWNA16LinearKernel for AutoGPTQLinearMethod" in result["log"]
    gap, same_top1 = max_gap(mixed, stock)
    assert same_top1 and gap <= 1e-5, gap
    assert mixed["greedy"] == stock["greedy"]


def mixtral_gptq_experts(tmp_path, fmt):
    """The tiny Mixtral with its experts from ``fmt``'s tiny checkpoint, the
    rest BF16: (root, plan, its vLLM run)."""
    root = tmp_path / "mixtral"
    make_tiny(root, arch="mixtral", formats=(UNQUANTIZED, fmt))
    rules = [{"targets": ["model.layers.*.block_sparse_moe.experts"], "source": fmt.tiny.source}]
    plan = recipe(root, tmp_path, "mix", {"bf16": "bf16", fmt.tiny.source: fmt.tiny.directory}, "bf16", rules)
    return root, plan, run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")


def test_mixtral_channelwise_gptq_experts_match_reference(tmp_path):
    _, plan, result = mixtral_gptq_experts(tmp_path, channelwise_tiny())
    assert {p.precision for p in plan.layers if p.layer.kind == "experts"} == {"int4-channel"}
    assert "experts <- source 'int4c' (gptq_int4) via" in result["log"]
    top1, worst = agreement(plan, TEACHER, result["teacher"])
    assert top1 >= 0.90 and worst <= 0.15, (top1, worst)


def layer_tensors(layer) -> dict[str, dict[str, torch.Tensor]]:
    """A planned layer's checkpoint tensors by member and suffix."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for file in {info.file for info in layer.tensors}:  # each shard opened once
        with safe_open(str(file), framework="pt") as f:
            for info in (i for i in layer.tensors if i.file == file):
                member, suffix = info.name.rsplit(".", 1)
                out.setdefault(member, {})[suffix] = f.get_tensor(info.name)
    return out


def test_mixtral_act_order_experts_match_reference(tmp_path):
    root, plan, result = mixtral_gptq_experts(tmp_path, act_order_tiny())
    assert {p.precision for p in plan.layers if p.layer.kind == "experts"} == {"int4-g128-actorder"}
    assert "experts <- source 'int4a' (gptq_int4) via DequantFallbackMoEMethod" in result["log"]
    top1, worst = agreement(plan, TEACHER, result["teacher"])
    assert top1 >= 0.90 and worst <= 0.15, (top1, worst)
    # at two groups a misread g_idx moves the logprobs too little for the reference's tolerance; exact instead:
    # stock vLLM on a BF16 checkpoint of the reference decoder's weights, its fp16 scales first rounded to bf16 as
    # vLLM's GPTQ MoE parameters hold them (then each product of an int4 code and a scale is exact in float32:
    # one rounding to bf16 on both sides), runs the same unquantized kernels
    weights = {}
    for layer in plan.layers:
        for member, tensors in layer_tensors(layer).items():
            if "scales" in tensors:
                tensors["scales"] = tensors["scales"].to(torch.bfloat16)
            qc = plan.sources[layer.source].quant_config if layer.fmt.quantized else None
            weights[f"{member}.weight"] = layer.fmt.dequantize(tensors, qc, torch.float32).to(torch.bfloat16)
    config = json.loads((root / "bf16" / "config.json").read_text())
    write_checkpoint(tmp_path / "dequantized", weights, config, 2 * 2**20)
    write_tokenizer(tmp_path / "dequantized")
    stock = run_vllm(tmp_path / "dequantized", "auto", REQUEST, tmp_path / "stock")
    assert max_gap(result, stock)[0] == 0.0
    assert result["greedy"] == stock["greedy"]
