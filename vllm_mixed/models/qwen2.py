"""Qwen2 dense (``Qwen2ForCausalLM``, e.g. Qwen2.5-7B/32B): the Llama layout
plus biases on q, k and v (``self_attn.{q,k,v}_proj.bias``). Published
quantized checkpoints (GPTQ, AWQ, FP8) keep those biases in the checkpoint's
float dtype; vLLM's ``QKVParallelLinear(bias=True)`` owns a float bias next
to whatever its quantization method registers, so a bias loads the same way
from every format."""

from __future__ import annotations

from typing import Any

from vllm_mixed.models.base import Geometry
from vllm_mixed.models.llama import Llama

__all__ = ["QWEN2"]


class Qwen2(Llama):
    architectures = ("Qwen2ForCausalLM",)
    name = "qwen2"
    attention_class = "Qwen2Attention"
    qkv_bias = True
    tiny_config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0, "bos_token_id": 0,
        "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 512, "intermediate_size": 512,
        "max_position_embeddings": 2048, "max_window_layers": 2, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": 1024,
    }  # fmt: skip

    def geometry(self, cfg: dict[str, Any]) -> Geometry:
        """vLLM's Qwen2Attention takes head_dim = hidden_size / heads (a
        ``head_dim`` key is not read)."""
        g = super().geometry(cfg)
        return Geometry(**{**g.to_dict(), "head_dim": g.hidden // g.heads})

    def hf_classes(self) -> tuple[type, type]:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2Config, Qwen2ForCausalLM


QWEN2 = Qwen2()
