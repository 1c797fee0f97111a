"""Qwen2-MoE (``Qwen2MoeForCausalLM``, e.g. Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B):
Qwen2 attention (q/k/v biases) plus a MoE block of routed experts (router
``mlp.gate``, experts ``mlp.experts.E.{gate,up,down}_proj``) and one shared
expert (``mlp.shared_expert.{gate,up,down}_proj``, which vLLM fuses into
``mlp.shared_expert.gate_up_proj``) scaled by ``sigmoid(mlp.shared_expert_gate
x)``, a [1, hidden] linear. The published GPTQ-Int4 checkpoint quantizes
attention, experts and shared expert and keeps both gates in fp16; vLLM builds
both gates without a quantization method."""

from __future__ import annotations

from typing import Any

from vllm_mixed.errors import MixedError
from vllm_mixed.models.base import (
    GATE_UP_DOWN,
    Geometry,
    Layer,
    Member,
    ModelSpec,
    attention_layers,
    embedding_layer,
    head_layers,
    hf_moe_state,
    moe_layers,
    norm_layer,
    positive,
)  # fmt: skip

__all__ = ["QWEN2_MOE"]


class Qwen2Moe(ModelSpec):
    architectures = ("Qwen2MoeForCausalLM",)
    name = "qwen2-moe"
    model_keys = (
        "architectures", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
        "vocab_size", "tie_word_embeddings",
    )  # fmt: skip
    tiny_config: dict[str, Any] = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 0, "decoder_sparse_step": 1, "hidden_act": "silu", "hidden_size": 512,
        "intermediate_size": 512, "max_position_embeddings": 2048, "max_window_layers": 2,
        "moe_intermediate_size": 256, "norm_topk_prob": False, "num_attention_heads": 4, "num_experts": 8,
        "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 512, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 1024,
    }  # fmt: skip
    tiny_rules = ({"targets": ["model.layers.*.mlp.experts", "model.layers.*.mlp.shared_expert.*"], "source": "int4"},)

    def geometry(self, cfg: dict[str, Any]) -> Geometry:
        hidden, heads = positive(cfg, "hidden_size"), positive(cfg, "num_attention_heads")
        return Geometry(
            hidden=hidden, heads=heads, kv_heads=positive(cfg, "num_key_value_heads", heads),
            head_dim=hidden // heads, vocab=positive(cfg, "vocab_size"),  # Qwen2MoeAttention reads no head_dim
            experts=positive(cfg, "num_experts"), inter=positive(cfg, "moe_intermediate_size"),
            attention_class="Qwen2MoeAttention", moe_class="Qwen2MoeSparseMoeBlock",
        )  # fmt: skip

    def layers(self, cfg: dict[str, Any]) -> list[Layer]:
        g = self.geometry(cfg)
        hidden = g.hidden
        shared = positive(cfg, "shared_expert_intermediate_size")
        if cfg.get("mlp_only_layers") or positive(cfg, "decoder_sparse_step", 1) != 1:
            raise MixedError(
                "Qwen2-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported yet; "
                "use a checkpoint in which every decoder layer is MoE"
            )
        if cfg.get("qkv_bias", True) is not True:
            raise MixedError("Qwen2-MoE without q/k/v biases (qkv_bias: false) is not supported; vLLM assumes them")
        layers = [embedding_layer(g)]
        for i in range(positive(cfg, "num_hidden_layers")):
            p = f"model.layers.{i}"
            mlp, se = f"{p}.mlp", f"{p}.mlp.shared_expert"
            router, experts = moe_layers(mlp, g, GATE_UP_DOWN)
            gate_up = (Member(f"{se}.gate_proj", (shared, hidden)), Member(f"{se}.up_proj", (shared, hidden)))
            layers += [
                norm_layer(f"{p}.input_layernorm", hidden),
                *attention_layers(f"{p}.self_attn", g, qk_norm=False, qkv_bias=True),
                norm_layer(f"{p}.post_attention_layernorm", hidden),
                router,
                Layer(f"{mlp}.shared_expert_gate", "router", "router",
                      (Member(f"{mlp}.shared_expert_gate", (1, hidden)),), "replicated"),
                Layer(f"{se}.gate_up_proj", "linear", "shared_expert", gate_up, "column"),
                Layer(f"{se}.down_proj", "linear", "shared_expert", (Member(f"{se}.down_proj", (hidden, shared)),), "row"),
                experts,
            ]  # fmt: skip
        return layers + head_layers(cfg, g)

    def reference_model(self, cfg: dict[str, Any], weights: dict[str, Any]) -> Any:
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        return hf_moe_state(
            Qwen2MoeConfig, Qwen2MoeForCausalLM, cfg, weights, cfg["num_experts"], ("gate_proj", "up_proj", "down_proj")
        )


QWEN2_MOE = Qwen2Moe()
