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


# --- the published models of the multi-architecture issue -------------------------------------------------------
# Byte totals below are recomputed here from each config's parameter counts (not from the plan's specs): float
# tensors 2 bytes per parameter; GPTQ int4 g128 per [out, in] linear: qweight in*out/2, qzeros (in/128)*(out/8)*4,
# scales (in/128)*out*2, g_idx in*4; FP8 block 128x128: out*in plus bf16 scales ceil(out/128)*ceil(in/128)*2.


def _linears(cfg):
    """{group: [(out, in), ...]} of the quantizable linears, and the float parameter count of the rest."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    attn = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd)] * layers
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if experts:
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        mlp = [(inter, h), (inter, h), (h, inter)] * experts * layers
    else:
        inter = cfg["intermediate_size"]
        mlp = [(inter, h), (inter, h), (h, inter)] * layers
    qk_norm = 2 * hd if cfg["architectures"] == ["Qwen3ForCausalLM"] or experts and "num_experts" in cfg else 0
    rest = 2 * cfg["vocab_size"] * h + h + layers * (2 * h + qk_norm + experts * h)
    return {"attention": attn, "mlp": mlp}, rest


def _gptq(shapes):
    return sum(k * n // 2 + k // 128 * n // 8 * 4 + k // 128 * n * 2 + k * 4 for n, k in shapes)


def _awq(shapes):  # qweight [k, n/8] int32, qzeros [k/128, n/8] int32, scales [k/128, n] fp16
    return sum(k * n // 2 + k // 128 * n // 8 * 4 + k // 128 * n * 2 for n, k in shapes)


def _fp8(shapes):
    return sum(n * k + -(-n // 128) * -(-k // 128) * 2 for n, k in shapes)


def _float(shapes):
    return sum(2 * n * k for n, k in shapes)


def _sources(root, model, checkpoints):
    """Sparse checkpoints of ``model``: 'bf16' from its published config, the others from the published quantized
    checkpoints; a format this build cannot read skips the test, naming it (its module lands with its branch)."""
    from vllm_mixed.errors import MixedError
    from vllm_mixed.testing.full_shape import write_published_checkpoint
    from vllm_mixed.testing.published import published_checkpoint, published_config

    out = {}
    for name, repo in checkpoints.items():
        if repo is None:
            out[name] = write_published_checkpoint(root / name, published_config(model))
            continue
        cfg, qc = published_checkpoint(repo)
        try:
            out[name] = write_published_checkpoint(root / name, cfg, qc)
        except MixedError as exc:
            pytest.skip(f"{repo}: no registered format reads its quantization_config on this build: {exc}")
    return out


def _plan(tmp_path, sources, base, default, rules):
    body = {"sources": {n: str(p) for n, p in sources.items()}, "base": base, "default": default,
            "dtype": "bfloat16", "rules": rules}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    return build_plan(load_recipe(tmp_path / "r.yaml"))


def test_mixtral_8x7b_gptq_experts_bf16_rest(tmp_path):
    """Mixtral-8x7B-Instruct: experts from a GPTQ-Int4 checkpoint (g128, desc_act false: the gptq_int4 layout at
    Mixtral's shape), the rest BF16; and from TheBloke's published act-order GPTQ once a format reads it."""
    from vllm_mixed.testing.published import published_config

    cfg = published_config("mixtral-8x7b-instruct-v0.1")
    (tmp_path / "ckpt").mkdir()
    bf16 = _sources(tmp_path / "ckpt", "mixtral-8x7b-instruct-v0.1", {"bf16": None})["bf16"]
    int4 = write_sparse_checkpoint(tmp_path / "ckpt", "gptq-int4", config=cfg)
    experts = [{"targets": ["model.layers.*.block_sparse_moe.experts"], "source": "int4"}]
    plan = _plan(tmp_path, {"bf16": bf16, "int4": int4}, "bf16", "bf16", experts)
    groups, rest = _linears(cfg)
    assert plan.total_bytes == _float(groups["attention"]) + 2 * rest + _gptq(groups["mlp"])
    assert (
        pure_plan(plan.recipe, plan.sources, "bf16").total_bytes
        == _float(groups["attention"] + groups["mlp"]) + 2 * rest
    )
    assert len(plan.layers) == 1 + 32 * 6 + 2 and plan.unused_rules == []
    assert {p.format for p in plan.layers if p.layer.kind == "router"} == {"unquantized"}


def test_mixtral_8x7b_published_gptq(tmp_path):
    """TheBloke's main-branch Mixtral GPTQ (4-bit, act-order, group_size -1: channelwise, one scale and zero
    point per output channel) as the experts' source, the rest BF16."""
    from vllm_mixed.testing.published import published_config

    sources = _sources(tmp_path, "mixtral-8x7b-instruct-v0.1",
                       {"bf16": None, "int4": "TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ"})  # fmt: skip
    plan = _plan(tmp_path, sources, "bf16", "bf16",
                 [{"targets": ["model.layers.*.block_sparse_moe.experts"], "source": "int4"}])  # fmt: skip
    assert {p.precision for p in plan.layers if p.layer.kind == "experts"} == {"int4-channel"}
    groups, rest = _linears(published_config("mixtral-8x7b-instruct-v0.1"))
    channelwise = sum(k * n // 2 + n // 8 * 4 + n * 2 + k * 4 for n, k in groups["mlp"])  # + g_idx, as published
    assert plan.total_bytes == _float(groups["attention"]) + 2 * rest + channelwise


def test_qwen3_235b_a22b_gptq_experts_fp8_rest(tmp_path):
    """Qwen3-235B-A22B from its two published quantized checkpoints only: experts GPTQ-Int4, everything else
    from the FP8 checkpoint (attention FP8; norms, routers, embeddings and head BF16 there)."""
    from vllm_mixed.testing.published import published_config

    sources = _sources(tmp_path, "qwen3-235b-a22b",
                       {"fp8": "Qwen/Qwen3-235B-A22B-FP8", "int4": "Qwen/Qwen3-235B-A22B-GPTQ-Int4"})  # fmt: skip
    plan = _plan(tmp_path, sources, "fp8", "fp8", [{"targets": ["model.layers.*.mlp.experts"], "source": "int4"}])
    groups, rest = _linears(published_config("qwen3-235b-a22b"))
    assert plan.total_bytes == _fp8(groups["attention"]) + 2 * rest + _gptq(groups["mlp"])
    pure = {n: pure_plan(plan.recipe, plan.sources, n).total_bytes for n in sources}
    assert pure == {"fp8": _fp8(groups["attention"] + groups["mlp"]) + 2 * rest,
                    "int4": _gptq(groups["attention"] + groups["mlp"]) + 2 * rest}  # fmt: skip
    assert len(plan.layers) == 1 + 94 * 8 + 2
    assert set(plan.bytes_by_precision()) == {"bf16", "fp8-block128x128", "int4-g128"}


def test_qwen3_32b_awq_mlp_fp8_rest(tmp_path):
    """Qwen3-32B: MLP from Qwen3-32B-AWQ, the rest from Qwen3-32B-FP8 (runs once the AWQ format is registered)."""
    from vllm_mixed.testing.published import published_config

    sources = _sources(tmp_path, "qwen3-32b", {"fp8": "Qwen/Qwen3-32B-FP8", "awq": "Qwen/Qwen3-32B-AWQ"})
    mlp = {"targets": ["model.layers.*.mlp.gate_up_proj", "model.layers.*.mlp.down_proj"], "source": "awq"}
    plan = _plan(tmp_path, sources, "fp8", "fp8", [mlp])
    groups, rest = _linears(published_config("qwen3-32b"))
    assert {p.source for p in plan.layers if p.layer.group == "mlp"} == {"awq"}
    assert plan.total_bytes == _fp8(groups["attention"]) + 2 * rest + _awq(groups["mlp"])  # 22,227,970,048
    assert len(plan.layers) == 1 + 64 * 8 + 2 and plan.unused_rules == []


def test_llama_31_8b_w4a16_mlp_fp8_attention(tmp_path):
    """Llama-3.1-8B-Instruct from RedHatAI's compressed-tensors W4A16 (MLP) and FP8-dynamic (the rest) (runs once
    the compressed-tensors source formats are registered)."""
    from vllm_mixed.testing.published import published_config

    sources = _sources(tmp_path, "llama-3.1-8b-instruct", {
        "fp8": "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic",
        "w4a16": "RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16",
    })  # fmt: skip
    mlp = {"targets": ["model.layers.*.mlp.gate_up_proj", "model.layers.*.mlp.down_proj"], "source": "w4a16"}
    plan = _plan(tmp_path, sources, "fp8", "fp8", [mlp])
    groups, rest = _linears(published_config("llama-3.1-8b-instruct"))
    assert {p.source for p in plan.layers if p.layer.group == "mlp"} == {"w4a16"}
    # FP8-dynamic: e4m3 weights with a bf16 scale per output channel; W4A16 g128 symmetric: packed int4, bf16
    # group scales and the int64 [2] weight_shape of every member
    fp8_channel = sum(n * k + 2 * n for n, k in groups["attention"])
    w4a16 = sum(n * k // 2 + n * (k // 128) * 2 + 16 for n, k in groups["mlp"])
    assert plan.total_bytes == fp8_channel + 2 * rest + w4a16  # 6,351,365,632
    assert len(plan.layers) == 1 + 32 * 6 + 2 and plan.unused_rules == []
