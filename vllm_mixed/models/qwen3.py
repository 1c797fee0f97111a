"""Qwen3 dense (``Qwen3ForCausalLM``, e.g. Qwen3-8B/14B/32B): the Llama
layout plus per-head RMS norms on q and k (``self_attn.q_norm``/``k_norm``)."""

from __future__ import annotations

from typing import Any

from vllm_mixed.models.llama import Llama

__all__ = ["QWEN3"]


class Qwen3(Llama):
    architectures = ("Qwen3ForCausalLM",)
    name = "qwen3"
    attention_class = "Qwen3Attention"
    qk_norm = True
    tiny_config: dict[str, Any] = {
        **Llama.tiny_config, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "max_window_layers": 2, "sliding_window": None, "use_sliding_window": False,
    }  # fmt: skip

    def hf_classes(self) -> tuple[type, type]:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3Config, Qwen3ForCausalLM


QWEN3 = Qwen3()
