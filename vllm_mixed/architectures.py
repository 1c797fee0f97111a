"""The layer table of each supported model: vLLM layer names, the checkpoint
members each one fuses, and their shapes as the model config implies them.

Rules match these vLLM names (what ``get_quant_method(layer, prefix)`` sees);
the plan maps them to checkpoint tensors through the members. A dense
Qwen3/Llama-style model is one more table function and one registry row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_mixed.errors import MixedError

__all__ = ["ARCHITECTURES", "MODEL_KEYS", "Layer", "Member", "layers_for"]

# config.json keys that must agree between sources of one model
MODEL_KEYS = (
    "architectures", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "vocab_size", "tie_word_embeddings",
)  # fmt: skip


@dataclass(frozen=True)
class Member:
    """One checkpoint module inside a vLLM layer: its name and weight shape
    ([out, in] for linears, [n] for norms)."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Layer:
    """One vLLM layer. ``kind`` decides which formats it may take: only
    ``linear`` and ``experts`` layers can be quantized."""

    name: str
    kind: str  # linear | experts | router | embedding | lm_head | norm
    group: str  # row of the plan table
    members: tuple[Member, ...]

    @property
    def quantizable(self) -> bool:
        return self.kind in ("linear", "experts")


def _get(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive integer from config.json; ``default`` where the key is absent or null."""
    value = cfg.get(key)
    if value is None and default is not None:
        return default
    if key not in cfg:
        raise MixedError(f"no {key!r}; the checkpoint's config.json is incomplete, restore it")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MixedError(f"{key!r} is {value!r}, not a positive integer; restore the checkpoint's config.json")
    return value


def qwen3_moe_layers(cfg: dict[str, Any]) -> list[Layer]:
    """Qwen3-MoE (Qwen3MoeForCausalLM): every decoder layer is MoE."""
    hidden, vocab = _get(cfg, "hidden_size"), _get(cfg, "vocab_size")
    heads, kv_heads = _get(cfg, "num_attention_heads"), _get(cfg, "num_key_value_heads")
    head_dim = _get(cfg, "head_dim", hidden // heads)
    experts, inter = _get(cfg, "num_experts"), _get(cfg, "moe_intermediate_size")
    if cfg.get("mlp_only_layers") or _get(cfg, "decoder_sparse_step", 1) != 1:
        raise MixedError(
            "Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported yet; "
            "use a checkpoint in which every decoder layer is MoE"
        )
    layers = [
        Layer("model.embed_tokens", "embedding", "embed_tokens", (Member("model.embed_tokens", (vocab, hidden)),))
    ]
    for i in range(_get(cfg, "num_hidden_layers")):
        p = f"model.layers.{i}"
        attn = f"{p}.self_attn"
        layers += [
            Layer(f"{p}.input_layernorm", "norm", "norms", (Member(f"{p}.input_layernorm", (hidden,)),)),
            Layer(
                f"{attn}.qkv_proj",
                "linear",
                "attention",
                (
                    Member(f"{attn}.q_proj", (heads * head_dim, hidden)),
                    Member(f"{attn}.k_proj", (kv_heads * head_dim, hidden)),
                    Member(f"{attn}.v_proj", (kv_heads * head_dim, hidden)),
                ),
            ),
            Layer(f"{attn}.o_proj", "linear", "attention", (Member(f"{attn}.o_proj", (hidden, heads * head_dim)),)),
            Layer(f"{attn}.q_norm", "norm", "norms", (Member(f"{attn}.q_norm", (head_dim,)),)),
            Layer(f"{attn}.k_norm", "norm", "norms", (Member(f"{attn}.k_norm", (head_dim,)),)),
            Layer(
                f"{p}.post_attention_layernorm", "norm", "norms", (Member(f"{p}.post_attention_layernorm", (hidden,)),)
            ),
            Layer(f"{p}.mlp.gate", "router", "router", (Member(f"{p}.mlp.gate", (experts, hidden)),)),
            Layer(
                f"{p}.mlp.experts",
                "experts",
                "experts",
                tuple(
                    Member(f"{p}.mlp.experts.{e}.{proj}", shape)
                    for e in range(experts)
                    for proj, shape in (
                        ("gate_proj", (inter, hidden)),
                        ("up_proj", (inter, hidden)),
                        ("down_proj", (hidden, inter)),
                    )
                ),
            ),
        ]
    layers.append(Layer("model.norm", "norm", "norms", (Member("model.norm", (hidden,)),)))
    if not cfg.get("tie_word_embeddings", False):
        layers.append(Layer("lm_head", "lm_head", "lm_head", (Member("lm_head", (vocab, hidden)),)))
    return layers


ARCHITECTURES: dict[str, Callable[[dict[str, Any]], list[Layer]]] = {
    "Qwen3MoeForCausalLM": qwen3_moe_layers,
}


def layers_for(cfg: dict[str, Any], where: str) -> list[Layer]:
    """The layer table for a config.json, or a clear error naming what is supported."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            try:
                return ARCHITECTURES[arch](cfg)
            except MixedError as exc:
                raise MixedError(f"{where}: {exc}") from None
    raise MixedError(f"{where}: architectures {archs} are not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
