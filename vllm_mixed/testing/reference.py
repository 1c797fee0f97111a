"""Independent float32 reference: transformers' own model class for the
architecture (``ModelSpec.reference_model``) with the weights each layer's
source holds, dequantized by the formats' float64 reference decoders.
Teacher-forced log-probabilities per position. Needs transformers."""

from __future__ import annotations

import torch
from safetensors import safe_open

from vllm_mixed.models import model_for
from vllm_mixed.plan import LoadPlan

__all__ = ["agreement", "compare", "dequantized_weights", "hf_model", "teacher_forced_logprobs"]


def dequantized_weights(plan: LoadPlan) -> dict[str, torch.Tensor]:
    """Checkpoint member name -> float32 weight, as the plan routes it (a
    bias under ``NAME.bias``)."""
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
            if "bias" in tensors:  # float in every format
                out[f"{member}.bias"] = tensors.pop("bias").to(torch.float32)
            qc = src.quant_config if p.fmt.quantized else None
            out[member] = p.fmt.dequantize(tensors, qc, torch.float64).to(torch.float32)
    return out


def hf_model(plan: LoadPlan) -> torch.nn.Module:
    """transformers' model of the plan's architecture on the plan's weights."""
    cfg = plan.base.config
    return model_for(cfg, "reference").reference_model(cfg, dequantized_weights(plan))


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


def agreement(plan: LoadPlan, prompts: list[list[int]], vllm_teacher: list[list[dict]]) -> tuple[float, float]:
    """(top-1 agreement over all positions, worst |logprob gap|) of vLLM's
    teacher-forced logprobs for ``prompts`` against this reference on
    ``plan``'s weights."""
    model = hf_model(plan)
    stats = [compare(teacher_forced_logprobs(model, ids), got) for ids, got in zip(prompts, vllm_teacher, strict=True)]
    n = sum(st["positions"] for st in stats)
    return sum(st["top1_agreement"] * st["positions"] for st in stats) / n, max(st["worst_logprob_gap"] for st in stats)
