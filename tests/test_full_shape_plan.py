"""``plan`` at Qwen3-30B-A3B's real shape (sparse checkpoints with real
headers) gives the byte totals of the published checkpoints, worked out
independently in docs/qwen3-30b-a3b.md from the parameter counts."""

from __future__ import annotations

import pytest
import yaml

from vllm_mixed.plan import build_plan, open_sources, pure_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.testing.full_shape import write_sparse_checkpoint

# qwen3-30b-a3b.md, "Bytes" table (GPTQ counts include g_idx)
BF16 = 61_064_245_248
FP8 = 31_170_895_872
GPTQ = 16_924_176_384
MIX_A = 18_263_470_080  # experts int4 (with g_idx), everything else BF16
MIX_B = 17_357_611_008  # experts int4 (with g_idx), attention FP8, rest BF16


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-30b-a3b")
    for name in ("bf16", "fp8", "gptq-int4"):
        write_sparse_checkpoint(root, name)
    return root


def _recipe(root, path, rules):
    body = {
        "sources": {"bf16": str(root / "bf16"), "fp8": str(root / "fp8"), "int4": str(root / "gptq-int4")},
        "base": "bf16", "default": "bf16", "dtype": "bfloat16", "rules": rules,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(body))
    return load_recipe(path)


def test_full_shape_totals(full, tmp_path):
    experts = {"targets": ["model.layers.*.mlp.experts"], "source": "int4"}
    attention = {"targets": ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"], "source": "fp8"}
    mix_a = _recipe(full, tmp_path / "a.yaml", [experts])
    sources = open_sources(mix_a)
    assert {n: pure_plan(mix_a, sources, n).total_bytes for n in sources} == {"bf16": BF16, "fp8": FP8, "int4": GPTQ}
    plan_a = build_plan(mix_a, sources)
    assert plan_a.total_bytes == MIX_A
    assert len(plan_a.layers) == 1 + 48 * 8 + 2
    plan_b = build_plan(_recipe(full, tmp_path / "b.yaml", [experts, attention]))
    assert plan_b.total_bytes == MIX_B
    by_prec = plan_b.bytes_by_precision()
    assert set(by_prec) == {"bf16", "int4-g128", "fp8-block128x128"}
    # attention in FP8: q+k+v+o weights at 1 byte plus bf16 block scales
    assert by_prec["fp8-block128x128"] == 905_969_664 + 2 * 48 * (32 * 16 + 2 * 4 * 16 + 16 * 32)
