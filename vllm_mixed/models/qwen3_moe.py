"""Qwen3-MoE (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B, Qwen3-235B-A22B):
every decoder layer is attention plus a routed MoE block (router ``mlp.gate``
and ``num_experts`` experts, each gate/up/down)."""

from __future__ import annotations

from typing import Any

from vllm_mixed.errors import MixedError
from vllm_mixed.models.base import (
    GATE_UP_DOWN,
    Geometry,
    Layer,
    ModelSpec,
    attention_layers,
    embedding_layer,
    head_layers,
    moe_layers,
    norm_layer,
    positive,
)  # fmt: skip

__all__ = ["QWEN3_MOE"]


class Qwen3Moe(ModelSpec):
    architectures = ("Qwen3MoeForCausalLM",)
    name = "qwen3-moe"
    model_keys = (
        "architectures", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "vocab_size", "tie_word_embeddings",
    )  # fmt: skip
    tiny_config: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "decoder_sparse_step": 1,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 512,
        "max_position_embeddings": 2048,
        "max_window_layers": 2,
        "mlp_only_layers": [],
        "moe_intermediate_size": 256,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 1024,
    }
    tiny_rules = ({"targets": ["model.layers.*.mlp.experts"], "source": "int4"},)

    def geometry(self, cfg: dict[str, Any]) -> Geometry:
        hidden, heads = positive(cfg, "hidden_size"), positive(cfg, "num_attention_heads")
        return Geometry(
            hidden=hidden, heads=heads, kv_heads=positive(cfg, "num_key_value_heads"),
            head_dim=positive(cfg, "head_dim", hidden // heads), vocab=positive(cfg, "vocab_size"),
            experts=positive(cfg, "num_experts"), inter=positive(cfg, "moe_intermediate_size"),
            attention_class="Qwen3MoeAttention", moe_class="Qwen3MoeSparseMoeBlock",
        )  # fmt: skip

    def layers(self, cfg: dict[str, Any]) -> list[Layer]:
        g = self.geometry(cfg)
        hidden = g.hidden
        if cfg.get("mlp_only_layers") or positive(cfg, "decoder_sparse_step", 1) != 1:
            raise MixedError(
                "Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported yet; "
                "use a checkpoint in which every decoder layer is MoE"
            )
        layers = [embedding_layer(g)]
        for i in range(positive(cfg, "num_hidden_layers")):
            p = f"model.layers.{i}"
            layers += [
                norm_layer(f"{p}.input_layernorm", hidden),
                *attention_layers(f"{p}.self_attn", g, qk_norm=True),
                norm_layer(f"{p}.post_attention_layernorm", hidden),
                *moe_layers(f"{p}.mlp", g, GATE_UP_DOWN),
            ]
        return layers + head_layers(cfg, g)

    def reference_model(self, cfg: dict[str, Any], weights: dict[str, Any]) -> Any:
        import torch
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(
            **{k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
        )
        config._attn_implementation = "eager"
        model = Qwen3MoeForCausalLM(config).to(torch.float32).eval()
        state = self.reference_state(cfg, model.state_dict(), weights)
        model.load_state_dict(state, strict=True)
        return model

    def reference_state(self, cfg: dict[str, Any], names: Any, weights: dict[str, Any]) -> dict[str, Any]:
        import torch

        state, experts = {}, range(cfg["num_experts"])
        for name in names:
            if name.endswith("mlp.experts.gate_up_proj"):  # transformers >= 5 fuses the experts
                p = name.removesuffix(".gate_up_proj")
                if f"{p}.0.gate_proj" in weights:
                    state[name] = torch.stack(
                        [torch.cat([weights[f"{p}.{e}.gate_proj"], weights[f"{p}.{e}.up_proj"]]) for e in experts]
                    )
            elif name.endswith("mlp.experts.down_proj"):
                p = name.removesuffix(".down_proj")
                if f"{p}.0.down_proj" in weights:
                    state[name] = torch.stack([weights[f"{p}.{e}.down_proj"] for e in experts])
            elif name.removesuffix(".weight") in weights:
                state[name] = weights[name.removesuffix(".weight")]
        return state


QWEN3_MOE = Qwen3Moe()
