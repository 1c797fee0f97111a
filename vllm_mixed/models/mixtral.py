"""Mixtral (``MixtralForCausalLM``, e.g. Mixtral-8x7B): Llama attention plus a
routed MoE block under ``block_sparse_moe``: the router
``block_sparse_moe.gate`` [experts, hidden] and ``num_local_experts``
experts ``block_sparse_moe.experts.E.{w1,w2,w3}`` (w1 gate, w3 up, w2 down).
vLLM's FusedMoE layer is ``block_sparse_moe.experts`` and loads w1/w3 into
its ``w13`` and w2 into ``w2`` (``ckpt_names=("w1", "w2", "w3")``); the
router is a GateLinear vLLM never quantizes, as in every published
checkpoint (GPTQ keeps it in fp16)."""

from __future__ import annotations

from typing import Any

from vllm_mixed.models.base import (
    Geometry,
    Layer,
    ModelSpec,
    attention_layers,
    embedding_layer,
    head_layers,
    hf_moe_state,
    moe_layers,
    norm_layer,
    positive,
)  # fmt: skip

__all__ = ["MIXTRAL"]


class Mixtral(ModelSpec):
    architectures = ("MixtralForCausalLM",)
    name = "mixtral"
    model_keys = (
        "architectures", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "num_local_experts", "num_experts_per_tok", "intermediate_size", "vocab_size",
        "tie_word_embeddings",
    )  # fmt: skip
    tiny_config: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 0, "head_dim": 128, "hidden_act": "silu", "hidden_size": 256,
        "intermediate_size": 256, "max_position_embeddings": 2048, "num_attention_heads": 4, "num_experts_per_tok": 2,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 1024,
    }  # fmt: skip
    tiny_rules = ({"targets": ["model.layers.*.block_sparse_moe.experts"], "source": "int4"},)

    def geometry(self, cfg: dict[str, Any]) -> Geometry:
        hidden, heads = positive(cfg, "hidden_size"), positive(cfg, "num_attention_heads")
        return Geometry(
            hidden=hidden, heads=heads, kv_heads=positive(cfg, "num_key_value_heads", heads),
            head_dim=positive(cfg, "head_dim", hidden // heads), vocab=positive(cfg, "vocab_size"),
            experts=positive(cfg, "num_local_experts"), inter=positive(cfg, "intermediate_size"),
            attention_class="MixtralAttention", moe_class="MixtralMoE",
        )  # fmt: skip

    def layers(self, cfg: dict[str, Any]) -> list[Layer]:
        g = self.geometry(cfg)
        hidden = g.hidden
        layers = [embedding_layer(g)]
        for i in range(positive(cfg, "num_hidden_layers")):
            p = f"model.layers.{i}"
            layers += [
                norm_layer(f"{p}.input_layernorm", hidden),
                *attention_layers(f"{p}.self_attn", g, qk_norm=False),
                norm_layer(f"{p}.post_attention_layernorm", hidden),
                *moe_layers(f"{p}.block_sparse_moe", g, (("w1", "in"), ("w2", "out"), ("w3", "in"))),
            ]
        return layers + head_layers(cfg, g)

    def reference_model(self, cfg: dict[str, Any], weights: dict[str, Any]) -> Any:
        from transformers import MixtralConfig, MixtralForCausalLM

        # transformers >= 5 names the block ``mlp`` and fuses the experts
        renamed = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in weights.items()}
        return hf_moe_state(
            MixtralConfig, MixtralForCausalLM, cfg, renamed, cfg["num_local_experts"], ("w1", "w3", "w2")
        )


MIXTRAL = Mixtral()
