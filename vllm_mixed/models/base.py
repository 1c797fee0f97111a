"""What every architecture module provides: its layer table (vLLM layer
names, the checkpoint members each fuses, their shapes and how vLLM shards
them) and the geometry the tensor-parallel rules read. Pure data; no torch,
no vLLM."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from vllm_mixed.errors import MixedError

__all__ = [
    "GATE_UP_DOWN", "Geometry", "Layer", "Member", "ModelSpec", "PARALLEL_STYLES", "attention_layers", "embedding_layer",
    "head_layers", "hf_moe_state", "moe_layers", "norm_layer", "positive",
]  # fmt: skip

# how vLLM shards a layer over tensor-parallel ranks (its layer class)
PARALLEL_STYLES = (
    "qkv",  # QKVParallelLinear: q heads split, KV heads split or replicated
    "column",  # (Merged)ColumnParallelLinear: each member's output split
    "row",  # RowParallelLinear: input split
    "replicated",  # ReplicatedLinear (routers)
    "experts",  # FusedMoE
    "vocab",  # VocabParallelEmbedding / ParallelLMHead
    "norm",  # replicated, not a linear
)
QUANTIZABLE_KINDS = ("linear", "experts")


@dataclass(frozen=True)
class Member:
    """One checkpoint module inside a vLLM layer: its name and weight shape
    ([out, in] for linears, [n] for norms). ``bias``: the module also has a
    ``bias`` [out], stored in the checkpoint's float dtype in every format
    (Qwen2's q/k/v) and loaded into the float bias vLLM's layer owns."""

    name: str
    shape: tuple[int, ...]
    bias: bool = False


@dataclass(frozen=True)
class Layer:
    """One vLLM layer. ``kind`` decides which formats it may take: only
    ``linear`` and ``experts`` layers can be quantized."""

    name: str
    kind: str  # linear | experts | router | embedding | lm_head | norm
    group: str  # row of the plan table
    members: tuple[Member, ...]
    parallel: str  # how vLLM shards it: one of PARALLEL_STYLES

    @property
    def quantizable(self) -> bool:
        return self.kind in QUANTIZABLE_KINDS

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "group": self.group,
            "parallel": self.parallel,
            "members": [[m.name, list(m.shape), *(["bias"] if m.bias else [])] for m in self.members],
        }

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> Layer:
        """From what :meth:`to_dict` wrote (a composed config.json); raises
        ValueError/TypeError/KeyError on anything else."""
        kind, group, style = str(data["kind"]), str(data["group"]), str(data["parallel"])
        if style not in PARALLEL_STYLES:
            raise ValueError(f"layer {name!r}: parallel style {style!r} is not one of {', '.join(PARALLEL_STYLES)}")
        members = []
        for entry in data["members"]:
            m_name, shape, *extra = entry
            if (
                not isinstance(m_name, str)
                or not all(type(d) is int and d >= 0 for d in shape)
                or extra not in ([], ["bias"])
            ):
                raise TypeError(f"layer {name!r}: member {entry!r} is not [name, [dims]] or [name, [dims], 'bias']")
            members.append(Member(m_name, tuple(shape), bool(extra)))
        return cls(name, kind, group, tuple(members), style)


@dataclass(frozen=True)
class Geometry:
    """The model-wide sizes vLLM's parallel checks divide (read once from
    config.json by the architecture module), and the vLLM classes whose
    checks they are."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int = 0  # routed experts per MoE layer; 0: dense
    inter: int = 0  # intermediate size of one expert
    attention_class: str = "Attention"
    moe_class: str = "SparseMoeBlock"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"unknown geometry keys {extra}")
        return cls(**data)


def positive(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive integer from config.json; ``default`` where the key is absent or null."""
    value = cfg.get(key)
    if value is None and default is not None:
        return default
    if key not in cfg:
        raise MixedError(f"no {key!r}; the checkpoint's config.json is incomplete, restore it")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MixedError(f"{key!r} is {value!r}, not a positive integer; restore the checkpoint's config.json")
    return value


class ModelSpec:
    """One architecture (a ``config.json`` ``architectures`` entry)."""

    #: the ``architectures`` names this module reads
    architectures: tuple[str, ...] = ()
    #: short name for ``make-tiny --arch``
    name: str = ""
    #: config.json of the tiny random model ``make-tiny`` writes (every GEMM
    #: dimension a multiple of 128, also per rank at tensor-parallel size 2)
    tiny_config: dict[str, Any] = {}
    #: the rules of the tiny model's recipe (its mix)
    tiny_rules: tuple[dict[str, Any], ...] = ()
    #: config.json keys that must agree between sources of one model
    model_keys: tuple[str, ...] = ()

    def layers(self, cfg: dict[str, Any]) -> list[Layer]:
        raise NotImplementedError

    def geometry(self, cfg: dict[str, Any]) -> Geometry:
        raise NotImplementedError

    def reference_model(self, cfg: dict[str, Any], weights: dict[str, Any]) -> Any:
        """transformers' own model class for this architecture in float32,
        loaded with ``weights`` (checkpoint member name -> [out, in] tensor):
        the independent reference of the tests and the GPU oracle."""
        raise NotImplementedError

    def reference_state(self, cfg: dict[str, Any], names: Any, weights: dict[str, Any]) -> dict[str, Any]:
        """Entries of transformers' state dict (parameter ``names``) built from
        ``weights`` (checkpoint member name -> [out, in] tensor): only those
        whose members are all in ``weights`` (a partial update for
        ``load_state_dict(strict=False)``). The default maps ``X.weight`` to
        member ``X``; architectures with fused parameters override it."""
        return {n: weights[n.removesuffix(".weight")] for n in names if n.removesuffix(".weight") in weights}


# --- pieces every decoder-only table shares (vLLM's names) ------------------------------------------------------


def norm_layer(name: str, size: int) -> Layer:
    return Layer(name, "norm", "norms", (Member(name, (size,)),), "norm")


def embedding_layer(g: Geometry) -> Layer:
    return Layer(
        "model.embed_tokens", "embedding", "embed_tokens", (Member("model.embed_tokens", (g.vocab, g.hidden)),), "vocab"
    )


def attention_layers(attn: str, g: Geometry, qk_norm: bool, qkv_bias: bool = False) -> list[Layer]:
    """``{attn}.qkv_proj`` (fusing q/k/v, with biases under ``qkv_bias``:
    Qwen2), ``{attn}.o_proj`` and, with ``qk_norm`` (Qwen3), the per-head
    ``q_norm``/``k_norm``."""
    hidden, head_dim = g.hidden, g.head_dim
    qkv = (
        Member(f"{attn}.q_proj", (g.heads * head_dim, hidden), qkv_bias),
        Member(f"{attn}.k_proj", (g.kv_heads * head_dim, hidden), qkv_bias),
        Member(f"{attn}.v_proj", (g.kv_heads * head_dim, hidden), qkv_bias),
    )
    o_proj = (Member(f"{attn}.o_proj", (hidden, g.heads * head_dim)),)
    out = [
        Layer(f"{attn}.qkv_proj", "linear", "attention", qkv, "qkv"),
        Layer(f"{attn}.o_proj", "linear", "attention", o_proj, "row"),
    ]
    if qk_norm:
        out += [norm_layer(f"{attn}.q_norm", head_dim), norm_layer(f"{attn}.k_norm", head_dim)]
    return out


# the per-expert projections of Qwen-style MoE checkpoints, in their order (see moe_layers)
GATE_UP_DOWN = (("gate_proj", "in"), ("up_proj", "in"), ("down_proj", "out"))


def moe_layers(block: str, g: Geometry, projections: tuple[tuple[str, str], ...]) -> list[Layer]:
    """A MoE block's router ``block.gate`` and routed experts
    ``block.experts`` (members ``experts.E.<name>`` in the checkpoint's
    order; ``projections``: (name, "in" for [inter, hidden] or "out" for
    [hidden, inter]))."""
    shapes = {"in": (g.inter, g.hidden), "out": (g.hidden, g.inter)}
    experts = tuple(Member(f"{block}.experts.{e}.{n}", shapes[k]) for e in range(g.experts) for n, k in projections)
    return [
        Layer(f"{block}.gate", "router", "router", (Member(f"{block}.gate", (g.experts, g.hidden)),), "replicated"),
        Layer(f"{block}.experts", "experts", "experts", experts, "experts"),
    ]


def head_layers(cfg: dict[str, Any], g: Geometry) -> list[Layer]:
    """``model.norm`` and, unless the embeddings are tied, ``lm_head``."""
    out = [norm_layer("model.norm", g.hidden)]
    if not cfg.get("tie_word_embeddings", False):
        out.append(Layer("lm_head", "lm_head", "lm_head", (Member("lm_head", (g.vocab, g.hidden)),), "vocab"))
    return out


def hf_moe_state(
    config_cls: type, model_cls: type, cfg: dict[str, Any], weights: dict[str, Any], experts: int,
    names: tuple[str, str, str],
) -> Any:  # fmt: skip
    """transformers' MoE model ``model_cls`` in float32 on ``weights``
    (checkpoint module name -> tensor, named as transformers names the
    modules): transformers >= 5 holds each layer's experts fused as
    ``mlp.experts.gate_up_proj`` [E, 2 inter, hidden] and
    ``mlp.experts.down_proj`` [E, hidden, inter]; ``names`` are the
    checkpoint's per-expert (gate, up, down) modules."""
    import torch

    config = config_cls(**{k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype", "dtype")})
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    gate, up, down = names
    state = {}
    for name in model.state_dict():
        p = name.rpartition(".")[0]
        if name.endswith("mlp.experts.gate_up_proj"):
            state[name] = torch.stack(
                [torch.cat([weights[f"{p}.{e}.{gate}"], weights[f"{p}.{e}.{up}"]]) for e in range(experts)]
            )
        elif name.endswith("mlp.experts.down_proj"):
            state[name] = torch.stack([weights[f"{p}.{e}.{down}"] for e in range(experts)])
        else:
            state[name] = weights[name.removesuffix(".weight")]
    model.load_state_dict(state, strict=True)
    return model
