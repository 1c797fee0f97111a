"""Independent float32 reference: transformers' own Qwen3-MoE with the weights
each layer's source holds, dequantized by the project's float64 format
reference. Teacher-forced log-probabilities per position."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from vllm_mixed.formats import FORMATS
from vllm_mixed.plan import LoadPlan


def dequantized_weights(plan: LoadPlan) -> dict[str, torch.Tensor]:
    """Checkpoint member name -> float32 weight, as the plan routes it."""
    out = {}
    handles: dict[str, object] = {}  # each shard opened once
    for p in plan.layers:
        src = plan.sources[p.source]
        by_member: dict[str, dict[str, torch.Tensor]] = {}
        for info in p.tensors:
            member, suffix = info.name.rsplit(".", 1)
            f = handles.setdefault(str(info.file), safe_open(str(info.file), framework="pt"))
            by_member.setdefault(member, {})[suffix] = f.get_tensor(info.name)
        for member, tensors in by_member.items():
            fmt = FORMATS[p.format]
            qc = src.quant_config if p.format != "unquantized" else None
            out[member] = fmt.dequantize(tensors, qc, torch.float64).to(torch.float32)
    return out


def hf_model(plan: LoadPlan) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = {k: v for k, v in plan.base.config.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    config = Qwen3MoeConfig(**cfg)
    config._attn_implementation = "eager"
    model = Qwen3MoeForCausalLM(config).to(torch.float32).eval()
    w = dequantized_weights(plan)
    state = {}
    n_experts = cfg["num_experts"]
    for name in model.state_dict():
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name.removesuffix(".gate_up_proj")
            state[name] = torch.stack(
                [torch.cat([w[f"{p}.{e}.gate_proj"], w[f"{p}.{e}.up_proj"]]) for e in range(n_experts)]
            )
        elif name.endswith("mlp.experts.down_proj"):
            p = name.removesuffix(".down_proj")
            state[name] = torch.stack([w[f"{p}.{e}.down_proj"] for e in range(n_experts)])
        else:
            state[name] = w[name.removesuffix(".weight")]
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def teacher_forced_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: log p(token t | tokens < t) for t >= 1."""
    logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    return torch.log_softmax(logits, dim=-1)[:-1]


def compare(ref: torch.Tensor, vllm_positions: list[dict[str, list[float]]]) -> dict[str, float]:
    """Top-1 agreement and worst |delta logprob| over the reference's top-3."""
    agree, worst = 0, 0.0
    for t, pos in enumerate(vllm_positions):
        top3 = torch.topk(ref[t], 3).indices.tolist()
        vllm_top1 = min(pos.items(), key=lambda kv: kv[1][1])[0]
        agree += int(str(top3[0]) == vllm_top1)
        for tok in top3:
            got = pos.get(str(tok))
            gap = float("inf") if got is None else abs(got[0] - ref[t, tok].item())
            worst = max(worst, gap)
    return {"top1_agreement": agree / len(vllm_positions), "worst_logprob_gap": worst, "positions": len(vllm_positions)}


if __name__ == "__main__":  # debugging aid: python reference.py RECIPE
    import sys

    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe

    m = hf_model(build_plan(load_recipe(sys.argv[1])))
    print(json.dumps(teacher_forced_logprobs(m, [1, 2, 3, 4]).argmax(-1).tolist()))
