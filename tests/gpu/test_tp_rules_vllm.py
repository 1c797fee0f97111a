"""``tp_constraints`` against vLLM's own checks (marked ``gpu``; skipped
without CUDA). On the device: ``. benchmarks/device_setup.sh && make test-gpu``.

Each rule restates a vLLM function; here the function itself decides, on a
grid of per-rank shapes around Qwen3-30B-A3B's and the tiny model's, and the
rule must agree: int4 linear kernel choice (choose_mp_linear_kernel), Marlin
MoE support (check_moe_marlin_supports_layer), the MoE-WNA16 regrouping
(MoeWNA16Method.create_weights), FP8 block validation for linears
(validate_fp8_block_shape) and experts (Fp8MoEMethod.create_weights)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and vLLM's CUDA build"),
]

from vllm_mixed import tp_constraints as tc  # noqa: E402
from vllm_mixed.formats.fp8_block import FP8_BLOCK  # noqa: E402
from vllm_mixed.formats.gptq_int4 import GPTQ_INT4  # noqa: E402
from vllm_mixed.models import Geometry, Layer, Member  # noqa: E402

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
TP = (1, 2, 3, 4, 6, 8, 16)
# (hidden, heads, kv heads, head_dim): Qwen3-30B-A3B, the tiny model, an odd one
ATTN = [(2048, 32, 4, 128), (256, 4, 2, 128), (2048, 24, 8, 64), (1536, 12, 4, 128)]


def _shards():
    for hidden, heads, kv, hd in ATTN:
        s = Geometry(hidden, heads, kv, hd, vocab=1024, experts=8, inter=768)
        for tp in TP:
            if tc._attention_split(s, tc.Parallel(tp)):
                continue
            for role, members, style in (
                ("qkv_proj", (), "qkv"),
                ("o_proj", (Member("o", (hidden, heads * hd)),), "row"),
            ):
                layer = Layer(f"model.layers.0.self_attn.{role}", "linear", "attention", members, style)
                yield tp, tc._linear_shard(s, tc.Parallel(tp), layer)


def test_int4_linear_kernel_choice():
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.platforms import current_platform
    from vllm.scalar_type import scalar_types

    cap = current_platform.get_device_capability().to_int()
    seen = set()
    for tp, sh in _shards():
        for dtype in ("bfloat16", "float16"):
            kernel, status, _ = GPTQ_INT4.linear_rule(sh, GPTQ, dtype, cap)
            n_full = sh.n if sh.row_split else sh.n * tp
            cfg = MPLinearLayerConfig(
                full_weight_shape=(sh.k_full, n_full), partition_weight_shape=(sh.k, sh.n),
                weight_type=scalar_types.uint4b8, act_type=getattr(torch, dtype), group_size=128,
                zero_points=False, has_g_idx=False,
            )  # fmt: skip
            try:
                chosen = choose_mp_linear_kernel(cfg).__name__
            except ValueError:
                chosen = None
            if status == tc.FAILS and chosen is not None:
                # refused on purpose: a group straddling ranks loads wrong scales
                assert sh.k % 128 and sh.k != sh.k_full, (tp, sh, chosen)
            else:
                assert chosen == kernel.split(": ")[1] + "LinearKernel", (tp, sh, dtype, kernel, chosen)
            seen.add((kernel, status))
    assert ("AutoGPTQLinearMethod: Machete", tc.OK) in seen


def test_marlin_moe_and_wna16_fallback():
    from vllm.model_executor.layers.quantization.moe_wna16 import MoeWNA16Config, MoeWNA16Method
    from vllm.model_executor.layers.quantization.utils.marlin_utils import check_moe_marlin_supports_layer

    for hidden in (2048, 256):
        for inter in (768, 384, 256, 192, 128, 96, 64, 48):
            for g in (128, 64, 32):
                s = Geometry(hidden, 32, 4, 128, vocab=1024, experts=8, inter=inter)
                kernel, status, _ = GPTQ_INT4.moe_rule(inter, s, tc.Parallel(), dict(GPTQ, group_size=g))
                layer = SimpleNamespace(
                    hidden_size=hidden, apply_router_weight_on_input=False,
                    moe_config=SimpleNamespace(intermediate_size_per_partition_unpadded=inter, hidden_dim=hidden),
                )  # fmt: skip
                marlin = check_moe_marlin_supports_layer(layer, g, allow_tile_padding=True)
                assert marlin == kernel.startswith("AutoGPTQMoEMethod"), (hidden, inter, g, kernel)
                if marlin:
                    continue
                method = MoeWNA16Method.__new__(MoeWNA16Method)  # create_weights reads only its config
                method.quant_config = MoeWNA16Config.from_config(dict(GPTQ, group_size=g))
                method.moe = SimpleNamespace(w13_num_shards=2)  # read by 0.32 only
                target = torch.nn.Module()
                try:
                    with torch.device("meta"):
                        method.create_weights(target, 2, hidden, inter, torch.bfloat16, weight_loader=lambda *a: None)
                except AssertionError:
                    assert status == tc.FAILS, (hidden, inter, g, kernel)
                else:
                    assert (status, kernel) == (tc.FALLBACK, f"MoeWNA16Method (Triton, group {target.group_size})")


def test_fp8_block_linear_validation(monkeypatch):
    import vllm.distributed
    from vllm.model_executor.layers.quantization.utils.fp8_utils import validate_fp8_block_shape

    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: 1)  # default arg only
    for tp, sh in _shards():
        _, status, _ = FP8_BLOCK.linear_rule(sh, FP8, "bfloat16", 90)
        layer = SimpleNamespace(tp_size=tp)
        in_full = sh.k_full
        out_full = sh.n if sh.row_split else sh.n * tp
        try:
            validate_fp8_block_shape(layer, in_full, out_full, sh.k, list(sh.parts), [128, 128])
            refused = False
        except ValueError:
            refused = True
        assert refused == (status == tc.FAILS), (tp, sh, status)


def test_fp8_moe_block_validation(monkeypatch):
    from vllm.model_executor.layers.quantization import fp8

    for tp in (1, 2, 4, 8):
        for inter_full in (768, 256):
            for use_ep in (False, True):
                par = tc.Parallel(tp, ep=use_ep)
                inter = inter_full // par.moe_tp
                s = Geometry(2048, 32, 4, 128, vocab=1024, experts=8, inter=inter_full)
                _, status, _ = FP8_BLOCK.moe_rule(inter, s, par, FP8)
                monkeypatch.setattr(fp8, "get_tensor_model_parallel_world_size", lambda tp=tp: tp)
                fake = SimpleNamespace(
                    quant_config=SimpleNamespace(is_checkpoint_fp8_serialized=True), block_quant=True,
                    weight_block_size=[128, 128],
                )  # fmt: skip
                try:
                    with torch.device("meta"):
                        fp8.Fp8MoEMethod.create_weights(fake, torch.nn.Module(), 2, 2048, inter, torch.bfloat16)
                    refused = False
                except ValueError as exc:
                    refused = "weight quantization block" in str(exc)
                except Exception:  # past the block checks, the fake method lacks what comes next
                    refused = False
                assert refused == (status == tc.FAILS), (tp, inter_full, use_ep, status)


ENGINE = """
import json, sys
from vllm import LLM, SamplingParams
kw = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], load_format="mixed", dtype="bfloat16", enforce_eager=True, attention_backend="TRITON_ATTN",
          max_model_len=256, gpu_memory_utilization=0.08, skip_tokenizer_init=True, **kw)
out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, temperature=0.0, detokenize=False))
print("TOKENS", list(out[0].outputs[0].token_ids))
"""


def test_engine_checks_shards_before_weights(tmp_path):
    """A real engine start: the tiny all-FP8 model starts; the same model
    with 192-wide experts (not whole 128-blocks) is refused by the plugin's
    message before vLLM's own Fp8MoEMethod check (i.e. before any weight).
    The shape comes from the composition, so the narrow model is composed
    from its own checkpoint (an ``hf_overrides`` on the served config no
    longer changes what was composed)."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from vllm_mixed.checkpoint_writer import write_checkpoint
    from vllm_mixed.compose import compose
    from vllm_mixed.formats.fp8_block import FP8_BLOCK
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.tiny import TINY_CONFIG, checkpoint_config, checkpoint_tensors, make_tiny, master_weights

    make_tiny(tmp_path / "tiny")
    narrow = dict(TINY_CONFIG, moe_intermediate_size=192)
    write_checkpoint(tmp_path / "narrow", checkpoint_tensors(narrow, master_weights(narrow, 0), FP8_BLOCK),
                     checkpoint_config(narrow, FP8_BLOCK))  # fmt: skip
    models = {}
    for name, src in (("fp8", tmp_path / "tiny" / "fp8"), ("narrow", tmp_path / "narrow")):
        (tmp_path / f"{name}.yaml").write_text(
            yaml.safe_dump({"sources": {"fp8": str(src)}, "base": "fp8", "default": "fp8"})
        )
        models[name] = compose(build_plan(load_recipe(tmp_path / f"{name}.yaml")), tmp_path / f"composed-{name}")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

    def start(model, **kw):
        cmd = [sys.executable, "-c", ENGINE, str(model), json.dumps(kw)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    ok = start(models["fp8"])
    assert ok.returncode == 0 and "TOKENS" in ok.stdout, ok.stdout[-2000:] + ok.stderr[-4000:]
    bad = start(models["narrow"])
    log = bad.stdout + bad.stderr
    assert bad.returncode != 0
    assert "at tensor_parallel_size 1, vLLM 0.26 (CUDA) rejects this recipe: layer group 'experts'" in log, log[-4000:]
    assert "is not divisible by weight quantization block_n" not in log, log[-4000:]  # vLLM's own check never ran
