"""Dense Llama-style decoders: ``LlamaForCausalLM`` and ``MistralForCausalLM``
(vLLM runs both with its Llama model). Each decoder layer is attention
(``qkv_proj`` fusing q/k/v, ``o_proj``) plus a gated MLP (``gate_up_proj``
fusing gate/up, ``down_proj``); no biases."""

from __future__ import annotations

from typing import Any

from vllm_mixed.models.base import (
    Geometry,
    Layer,
    Member,
    ModelSpec,
    attention_layers,
    embedding_layer,
    head_layers,
    norm_layer,
    positive,
)  # fmt: skip

__all__ = ["LLAMA", "Llama"]


class Llama(ModelSpec):
    architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    name = "llama"
    model_keys = (
        "architectures", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings",
    )  # fmt: skip
    attention_class = "LlamaAttention"
    qk_norm = False  # Qwen3 adds per-head RMS norms on q and k
    qkv_bias = False  # Qwen2 adds biases to q, k and v
    tiny_config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "bos_token_id": 0, "eos_token_id": 0, "head_dim": 128, "hidden_act": "silu", "hidden_size": 256,
        "intermediate_size": 512, "max_position_embeddings": 2048, "mlp_bias": False, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 1024,
    }  # fmt: skip
    tiny_rules = ({"targets": ["model.layers.*.mlp.gate_up_proj", "model.layers.*.mlp.down_proj"], "source": "int4"},)

    def geometry(self, cfg: dict[str, Any]) -> Geometry:
        hidden, heads = positive(cfg, "hidden_size"), positive(cfg, "num_attention_heads")
        return Geometry(
            hidden=hidden, heads=heads, kv_heads=positive(cfg, "num_key_value_heads", heads),
            head_dim=positive(cfg, "head_dim", hidden // heads), vocab=positive(cfg, "vocab_size"),
            attention_class=self.attention_class,
        )  # fmt: skip

    def layers(self, cfg: dict[str, Any]) -> list[Layer]:
        g = self.geometry(cfg)
        hidden, inter = g.hidden, positive(cfg, "intermediate_size")
        layers = [embedding_layer(g)]
        for i in range(positive(cfg, "num_hidden_layers")):
            p = f"model.layers.{i}"
            mlp = f"{p}.mlp"
            gate_up = (Member(f"{mlp}.gate_proj", (inter, hidden)), Member(f"{mlp}.up_proj", (inter, hidden)))
            layers += [
                norm_layer(f"{p}.input_layernorm", hidden),
                *attention_layers(f"{p}.self_attn", g, self.qk_norm, self.qkv_bias),
                norm_layer(f"{p}.post_attention_layernorm", hidden),
                Layer(f"{mlp}.gate_up_proj", "linear", "mlp", gate_up, "column"),
                Layer(f"{mlp}.down_proj", "linear", "mlp", (Member(f"{mlp}.down_proj", (hidden, inter)),), "row"),
            ]
        return layers + head_layers(cfg, g)

    def reference_model(self, cfg: dict[str, Any], weights: dict[str, Any]) -> Any:
        import torch

        config_cls, model_cls = self.hf_classes()
        config = config_cls(
            **{k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
        )
        config._attn_implementation = "eager"
        model = model_cls(config).to(torch.float32).eval()
        state = self.reference_state(cfg, model.state_dict(), weights)
        model.load_state_dict(state, strict=True)
        return model

    def hf_classes(self) -> tuple[type, type]:
        """transformers' config and model classes of this architecture."""
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaConfig, LlamaForCausalLM


LLAMA = Llama()
