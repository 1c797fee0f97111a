"""On vLLM's CPU build each quantized layer runs on vLLM's own method for its
format wherever vLLM has a kernel for it on this CPU, and on the dequantizing
fallback elsewhere. Here: the plugin's native layers against stock vLLM on a
single checkpoint holding the same weights (identical teacher-forced
logprobs: the same kernels), the fallback forced by its environment variable
against the float reference, and the load log naming each choice."""

from __future__ import annotations

import random
import shutil

import pytest
import yaml

from tests.e2e.conftest import max_gap, run_vllm, write_recipe
from vllm_mixed.checkpoint_writer import write_checkpoint
from vllm_mixed.compose import compose
from vllm_mixed.cpu_kernels import FALLBACK_ENV, cpu_fallback_reason, cpu_resident_bytes
from vllm_mixed.export import export
from vllm_mixed.formats.fp8_block import FP8_QUANT_CONFIG
from vllm_mixed.formats.gptq_int4 import GPTQ_QUANT_CONFIG
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.resident import ResidentReport
from vllm_mixed.testing.reference import agreement

_rng = random.Random(99)
TEACHER = [[_rng.randrange(3, 1000) for _ in range(32)] for _ in range(3)]
REQUEST = {"teacher": TEACHER, "greedy": TEACHER[:1], "max_tokens": 8}
ATTENTION = ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"]
EXPERTS = ["model.layers.*.mlp.experts"]


def recipe(tiny_dirs, tmp_path, name, default, rules):
    """A recipe over the three tiny checkpoints (base bf16)."""
    dirs = {"bf16": "bf16", "fp8": "fp8", "int4": "gptq-int4"}
    data = {"sources": {n: str(tiny_dirs / d) for n, d in dirs.items()}, "base": "bf16", "default": default,
            "dtype": "bfloat16", "rules": rules}  # fmt: skip
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def assert_resident_as_planned(log, plan):
    """The weight bytes the engine's model holds after loading (measured in
    the worker, logged by the loader) equal the plan's CPU prediction within
    2 %, and the heap grew by them plus the non-weight buffers plus at most
    1.5 MiB (the runtime's own objects): no weight copy left uncounted."""
    report = ResidentReport.parse(log)
    assert report is not None, "no 'resident weights' line in the load log"
    predicted = cpu_resident_bytes(plan)
    assert report.predicted == predicted
    assert abs(report.held / predicted - 1) <= 0.02, (report, predicted)
    if report.heap_growth is not None:
        extra = report.heap_growth - report.held - report.buffers
        assert -0.01 * report.held <= extra <= 1.5 * 2**20, report
    return report


def skip_without_kernel(fmt, kind, qc):
    why = cpu_fallback_reason(fmt, kind, qc)
    if why is not None:
        pytest.skip(f"vLLM's CPU build has no {fmt} {kind} kernel on this CPU: {why}")


def test_int4_attention_runs_natively_and_matches_stock(tiny_dirs, tmp_path):
    """int4 attention from the GPTQ checkpoint, the rest BF16: the plugin runs
    vLLM's AutoGPTQLinearMethod; stock vLLM serves the same weights exported
    to one compressed-tensors checkpoint, on the same CPU int4 GEMM."""
    skip_without_kernel("gptq_int4", "linear", GPTQ_QUANT_CONFIG)
    plan = build_plan(
        load_recipe(recipe(tiny_dirs, tmp_path, "attn-int4", "bf16", [{"targets": ATTENTION, "source": "int4"}]))
    )
    mixed = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    stock = run_vllm(export(plan, tmp_path / "export", progress=False), "auto", REQUEST, tmp_path / "stock")
    assert "qkv_proj <- source 'int4' (gptq_int4) via AutoGPTQLinearMethod" in mixed["log"]
    assert "Using CPUWNA16LinearKernel" in mixed["log"] and "CPUWNA16LinearKernel" in stock["log"]
    report = assert_resident_as_planned(mixed["log"], plan)
    # the int4 attention stays packed: less held than the same model all in BF16
    bf16 = build_plan(load_recipe(recipe(tiny_dirs, tmp_path, "bf16", "bf16", [])))
    assert report.held < cpu_resident_bytes(bf16)
    gap, same_top1 = max_gap(mixed, stock)
    assert same_top1 and gap <= 1e-5, gap
    assert mixed["greedy"] == stock["greedy"]


@pytest.mark.parametrize("name", ["all-int4", "all-fp8", "mix"])
def test_native_recipes_match_stock_single_checkpoints(name, tiny_dirs, tmp_path):
    """The pure recipes against stock vLLM on the GPTQ / FP8 checkpoint, the
    mix (int4 experts, BF16 rest) against a hand-spliced checkpoint: the GPTQ
    experts and the BF16 rest under one GPTQ config that quantizes the
    experts only. Needs vLLM's CPU MoE kernels (AMX), else skipped."""
    fmt, qc = ("fp8_block", FP8_QUANT_CONFIG) if name == "all-fp8" else ("gptq_int4", GPTQ_QUANT_CONFIG)
    skip_without_kernel(fmt, "experts", qc)
    skip_without_kernel(fmt, "linear", qc)
    rules = {
        "all-int4": ("int4", []),
        "all-fp8": ("fp8", []),
        "mix": ("bf16", [{"targets": EXPERTS, "source": "int4"}]),
    }
    default, rule = rules[name]
    plan = build_plan(load_recipe(recipe(tiny_dirs, tmp_path, name, default, rule)))
    mixed = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path / "mixed")
    single = {"all-int4": tiny_dirs / "gptq-int4", "all-fp8": tiny_dirs / "fp8"}.get(name) or splice(plan, tmp_path)
    stock = run_vllm(single, "auto", REQUEST, tmp_path / "stock")
    gap, same_top1 = max_gap(mixed, stock)
    assert same_top1 and gap <= 1e-5, gap
    assert_resident_as_planned(mixed["log"], plan)


def splice(plan, tmp_path):
    """One GPTQ checkpoint holding exactly the plan's tensors, quantizing only
    the experts (``modules_in_block_to_quantize``)."""
    from safetensors import safe_open

    tensors = {}
    for p in plan.layers:
        for info in p.tensors:
            with safe_open(str(info.file), framework="pt") as f:
                tensors[info.name] = f.get_tensor(info.name)
    config = dict(
        plan.base.config, quantization_config={**GPTQ_QUANT_CONFIG, "modules_in_block_to_quantize": [["mlp.experts"]]}
    )
    out = tmp_path / "spliced"
    write_checkpoint(out, tensors, config)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(plan.base.path / name, out / name)
    return out


def test_forced_fallback_dequantizes_and_matches_reference(tiny_dirs, tmp_path, monkeypatch):
    """VLLM_MIXED_CPU_FALLBACK=1: every quantized layer on the fallback, within
    the float reference's tolerance (the e2e reference test's bounds), holding
    the dequantized footprint the plan predicts for it."""
    plan = build_plan(load_recipe(write_recipe(tiny_dirs, "all-int4", tmp_path)))
    result = run_vllm(compose(plan, tmp_path / "composed"), "mixed", REQUEST, tmp_path, env={FALLBACK_ENV: "1"})
    with monkeypatch.context() as env:
        env.setenv(FALLBACK_ENV, "1")
        report = assert_resident_as_planned(result["log"], plan)
    bf16 = cpu_resident_bytes(build_plan(load_recipe(write_recipe(tiny_dirs, "all-bf16", tmp_path))))
    assert abs(report.held / bf16 - 1) <= 0.02, (report, bf16)  # the BF16 footprint
    assert f"via DequantFallbackLinearMethod (dequantized to the model dtype: {FALLBACK_ENV}=1)" in result["log"]
    assert "experts <- source 'int4' (gptq_int4) via DequantFallbackMoEMethod" in result["log"]
    assert "CPUWNA16LinearKernel" not in result["log"]
    top1, worst = agreement(plan, TEACHER, result["teacher"])
    assert top1 >= 0.90 and worst <= 0.15, (top1, worst)


def test_generate_reports_the_resident_weights(tiny_dirs, tmp_path):
    """``vllm-mixed generate`` prints the weight bytes its engine holds (asked
    of the worker after loading) next to the plan's prediction."""
    import os
    import re
    import subprocess
    import sys

    plan = build_plan(load_recipe(write_recipe(tiny_dirs, "mix", tmp_path)))
    model = compose(plan, tmp_path / "composed")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_mixed.cli", "generate", str(model), "--max-tokens", "4"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = re.search(r"resident on this CPU: (\d+) B .* the plan predicts (\d+) B", proc.stdout)
    assert found, proc.stdout[-2000:]
    held, predicted = map(int, found.groups())
    assert predicted == cpu_resident_bytes(plan)
    assert abs(held / predicted - 1) <= 0.02
