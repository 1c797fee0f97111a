"""The four tiny recipes through ``load_format="mixed"`` on vLLM's CPU build,
each against an independent float32 transformers reference on dequantized
weights (teacher-forced), and all-bf16 against stock vLLM's own bf16 load."""

from __future__ import annotations

import json
import random
import re

import pytest

from tests.e2e.conftest import RECIPES, run_vllm, write_recipe
from vllm_mixed.compose import compose
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.testing.reference import agreement

TOP1_MIN = 0.90
LOGPROB_GAP_MAX = 0.15

_rng = random.Random(1234)  # fixed sequences: the comparison must be repeatable
TEACHER = [[_rng.randrange(3, 1000) for _ in range(40)] for _ in range(3)]
GREEDY = [[_rng.randrange(3, 1000) for _ in range(12)] for _ in range(3)]
REQUEST = {"greedy": GREEDY, "teacher": TEACHER, "max_tokens": 24, "text": ["Hello, world! The capital of France is"]}


@pytest.fixture(scope="module")
def stock_bf16(tiny_dirs, tmp_path_factory):
    return run_vllm(tiny_dirs / "bf16", "auto", REQUEST, tmp_path_factory.mktemp("stock"))


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_matches_reference(name, tiny_dirs, tmp_path, stock_bf16, record_property):
    recipe = load_recipe(write_recipe(tiny_dirs, name, tmp_path))
    plan = build_plan(recipe)
    composed = compose(plan, tmp_path / "composed")
    result = run_vllm(composed, "mixed", REQUEST, tmp_path)

    top1, worst = agreement(plan, TEACHER, result["teacher"])
    load = re.search(r"vllm-mixed: loaded (\d+) tensors.* in ([\d.]+) s", result["log"])
    stock_load = re.search(r"Loading weights took ([\d.]+) seconds", stock_bf16["log"])
    summary = {
        "recipe": name, "top1_agreement": round(top1, 4), "worst_logprob_gap": round(worst, 4),
        "mixed_load_s": float(load.group(2)) if load else None, "init_s": round(result["init_s"], 2),
        "stock_bf16_load_s": float(stock_load.group(1)) if stock_load else None,
        "stock_bf16_init_s": round(stock_bf16["init_s"], 2),
    }  # fmt: skip
    record_property("summary", json.dumps(summary))
    print("E2E", json.dumps(summary))

    assert load, "the mixed loader did not report its load"
    assert top1 >= TOP1_MIN, summary
    assert worst <= LOGPROB_GAP_MAX, summary
    assert result["text"][0], "a text prompt produced no text"
    if name == "all-bf16":
        assert result["greedy"] == stock_bf16["greedy"], "all-bf16 must give stock vLLM's greedy tokens"
