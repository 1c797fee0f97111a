"""Whether the kernel vLLM (CUDA, the release named by
``vllm_compat.KERNEL_RULES_RELEASE``) picks for each tensor-parallel shard of a
planned layer accepts it, and what vLLM falls back to when it does not.

Pure arithmetic over the model's geometry (from its architecture module) and
each source's own ``quantization_config`` (no torch, no vLLM), so ``plan --tp
N`` can say before any GPU is involved whether an engine start would fail,
and the engine (``MixedPrecisionConfig.get_quant_method``) runs the same rules
before the first weight is allocated. The model-level splits (heads, experts,
vocabulary) are here; each format's kernel rules live in its module under
``formats/``. Every rule restates one check in vLLM's sources, named as
``file:function`` (paths under ``vllm/``). The GPU is taken to be a Hopper
(sm90) unless a capability is passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vllm_mixed.errors import MixedError
from vllm_mixed.formats import get_format
from vllm_mixed.models.base import Geometry, Layer
from vllm_mixed.parallel import FAILS, FALLBACK, HOPPER, OK, LinearShard, Parallel
from vllm_mixed.vllm_compat import KERNEL_RULES_RELEASE

__all__ = [
    "FAILS", "FALLBACK", "HOPPER", "OK", "Parallel", "Routed", "ShardCheck", "check_layers", "raise_on_failures",
]  # fmt: skip


@dataclass(frozen=True)
class Routed:
    """One planned layer: its source, the format it has there, and that
    source's own quantization_config."""

    layer: Layer
    source: str
    format: str
    quant_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class ShardCheck:
    """One row of ``plan --tp N``: layers of one group, pattern and route."""

    group: str
    layer: str  # vLLM layer name with the layer index as "*"
    source: str
    format: str
    layers: int
    shard: str  # the weight each rank holds
    kernel: str  # what vLLM runs on it
    status: str  # OK | FALLBACK | FAILS
    reason: str = ""  # the vLLM rule behind a fallback or failure
    fixes: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        return {OK: "ok", FALLBACK: f"fallback to {self.kernel}"}.get(self.status, f"FAILS: {self.reason}")

    @property
    def fallback_note(self) -> str:
        """For a fallback row: the kernel, why, and how to keep the preferred one."""
        faster = f"; to keep the preferred kernel: {' or '.join(self.fixes)}" if self.fixes else ""
        return f"{self.group} ({self.layer}) falls back to {self.kernel}: {self.reason}{faster}"


@dataclass(frozen=True)
class _Verdict:
    shard: str
    kernel: str
    status: str = OK
    reason: str = ""


# --- model-level splits: every precision -------------------------------------------------


def _attention_split(s: Geometry, par: Parallel) -> str | None:
    """config/model.py:ModelConfig.verify_with_parallel_config (heads % tp);
    the model's attention class (e.g. Qwen3MoeAttention.__init__) and layers/linear.py:
    QKVParallelLinear.__init__: KV heads are split when there are at least tp
    of them, else replicated, tp a multiple of their count."""
    if s.heads % par.tp:
        return (
            f"{s.heads} attention heads are not divisible by {par.tp} ranks (ModelConfig.verify_with_parallel_config)"
        )
    if s.kv_heads >= par.tp and s.kv_heads % par.tp:
        return f"{s.kv_heads} KV heads are not divisible by {par.tp} ranks ({s.attention_class}.__init__ asserts)"
    if s.kv_heads < par.tp and par.tp % s.kv_heads:
        return (
            f"{par.tp} ranks are not a multiple of the {s.kv_heads} KV heads to replicate (QKVParallelLinear.__init__)"
        )
    return None


def _experts_split(s: Geometry, par: Parallel) -> str | None:
    """The model's MoE block (e.g. Qwen3MoeSparseMoeBlock.__init__: tp <= experts);
    fused_moe/config.py:FusedMoEConfig.__post_init__ asserts the intermediate
    size splits evenly over the MoE ranks."""
    if par.tp > s.experts:
        return f"tensor_parallel_size {par.tp} is greater than the {s.experts} experts ({s.moe_class}.__init__)"
    if s.inter % par.moe_tp:
        return (
            f"moe_intermediate_size {s.inter} is not divisible by {par.moe_tp} MoE ranks (FusedMoEConfig.__post_init__)"
        )
    return None


def _vocab_split(s: Geometry, par: Parallel) -> str | None:
    """layers/vocab_parallel_embedding.py: the vocabulary, padded to a multiple
    of 64 (pad_vocab_size), is divided evenly (vocab_range_from_global_vocab_size)."""
    padded = -(-s.vocab // 64) * 64
    if padded % par.tp:
        return f"the padded vocabulary {padded} is not divisible by {par.tp} ranks (vocab_range_from_global_vocab_size)"
    return None


# --- linear layers -----------------------------------------------------------------------


def _linear_shard(s: Geometry, par: Parallel, layer: Layer) -> LinearShard:
    """By the layer's vLLM class (its ``parallel`` style in the model table):
    QKVParallelLinear (q split, KV split or replicated), RowParallelLinear
    (input split), (Merged)ColumnParallelLinear (each member's output split),
    ReplicatedLinear (not split)."""
    tp, style = par.tp, layer.parallel
    if style == "qkv":
        kv = max(1, s.kv_heads // tp) * s.head_dim
        note = f" (KV heads replicated x{tp // s.kv_heads})" if tp > s.kv_heads else ""
        return LinearShard(s.hidden, s.hidden, (s.heads // tp * s.head_dim, kv, kv), False, tp > 1, note)
    if style == "row":
        out, k = layer.members[0].shape
        return LinearShard(k, k // tp, (out,), tp > 1, False)
    if style == "column":
        k = layer.members[0].shape[1]
        return LinearShard(k, k, tuple(m.shape[0] // tp for m in layer.members), False, tp > 1)
    out, k = layer.members[0].shape
    return LinearShard(k, k, (out,), False, False, " replicated")


def _evaluate(r: Routed, s: Geometry, par: Parallel, dtype: str, capability: int) -> _Verdict:
    """The shard of one layer at ``par`` and what vLLM does with it."""
    kind, qc, fmt = r.layer.kind, r.quant_config or {}, get_format(r.format)
    linear_method, moe_method = fmt.vllm_methods()
    if kind == "norm":
        return _Verdict("replicated", "-")
    if kind in ("embedding", "lm_head"):
        padded = -(-s.vocab // 64) * 64
        failed = _vocab_split(s, par)
        shard = f"[{padded // par.tp if not failed else padded} x {s.hidden}] of vocab {s.vocab}"
        return _Verdict(shard, "UnquantizedEmbeddingMethod", FAILS if failed else OK, failed or "")
    if kind == "experts":
        failed = _experts_split(s, par)
        inter = s.inter // par.moe_tp
        per = f"gate/up [{s.hidden} -> {inter}], down [{inter} -> {s.hidden}]"
        ep = par.tp * par.dp
        who = f"{s.experts // ep} of {s.experts} experts" if par.use_ep else f"{s.experts} experts"
        shard = f"{who} x ({per})"
        if failed:
            return _Verdict(shard, moe_method, FAILS, failed)
        return _Verdict(shard, *(fmt.moe_rule(inter, s, par, qc) or (moe_method, OK, "")))
    failed = _attention_split(s, par) if r.layer.group == "attention" else None
    if failed:
        return _Verdict("-", linear_method, FAILS, failed)
    sh = _linear_shard(s, par, r.layer)
    return _Verdict(str(sh), *(fmt.linear_rule(sh, qc, dtype, capability) or (linear_method, OK, "")))


def _pattern(layer: Layer) -> str:
    if layer.kind == "norm":
        return "all norms"
    return re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", layer.name)


def check_layers(
    geometry: Geometry,
    routed: Iterable[Routed],
    par: Parallel,
    *,
    dtype: str = "bfloat16",
    capability: int = HOPPER,
    sources: dict[str, tuple[str, dict[str, Any] | None]] | None = None,
) -> list[ShardCheck]:
    """One row per (group, layer pattern, source, format), in model order.
    ``sources`` (name -> format, quantization_config) lets a failing row
    suggest another source that would work."""
    s = geometry
    rows: dict[tuple[str, str, str, str], list[Any]] = {}
    for r in routed:
        key = (r.layer.group, _pattern(r.layer), r.source, r.format)
        if key in rows:
            rows[key][1] += 1
        else:
            rows[key] = [r, 1]
    evaluate = lambda p: [_evaluate(r, s, p, dtype, capability) for r, _ in rows.values()]  # noqa: E731
    starts = lambda p: all(v.status != FAILS for v in evaluate(p))  # noqa: E731  (the whole recipe, at layout p)
    verdicts = evaluate(par)
    smaller = None
    if any(v.status == FAILS for v in verdicts):  # the largest smaller size at which every layer starts
        smaller = next(
            (
                t
                for t in range(par.tp - 1, 0, -1)
                if all(v.status != FAILS for v in evaluate(Parallel(t, par.ep, par.dp)))
            ),
            None,
        )
    out = []
    for ((group, pattern, source, fmt), (r, n)), v in zip(rows.items(), verdicts):
        if v.status == FAILS:
            fixes = _fixes(r, s, par, smaller, dtype, capability, sources or {})
        elif v.status == FALLBACK:  # starts, on a slower kernel: how to keep the preferred one
            fixes = _preferred(r, s, par, dtype, capability, starts)
        else:
            fixes = ()
        out.append(ShardCheck(group, pattern, source, fmt, n, v.shard, v.kernel, v.status, v.reason, fixes))
    return out


def _fixes(
    r: Routed, s: Geometry, par: Parallel, smaller: int | None, dtype: str, capability: int, sources: dict[str, Any]
) -> tuple[str, ...]:
    """What would make this layer start: a smaller tensor-parallel size (at
    which the whole recipe starts), expert parallelism, or another source."""
    works = lambda rr, p: _evaluate(rr, s, p, dtype, capability).status != FAILS  # noqa: E731
    out = []
    if smaller is not None:
        out.append(f"use tensor_parallel_size {smaller} (`plan --tp {smaller}`)")
    if r.layer.kind == "experts" and not par.use_ep and works(r, Parallel(par.tp, True, par.dp)):
        out.append(
            "enable expert parallelism (vLLM --enable-expert-parallel, `plan --ep`): each rank then holds "
            f"whole experts (intermediate {s.inter})"
        )
    for name, (fmt, qc) in sorted(sources.items()):
        alt = Routed(r.layer, name, fmt, qc)
        if fmt != r.format and (r.layer.quantizable or not get_format(fmt).quantized) and works(alt, par):
            kernel = _evaluate(alt, s, par, dtype, capability).kernel
            out.append(f"route {_pattern(r.layer)!r} to source {name!r} ({fmt}: {kernel})")
    return tuple(out)


def _preferred(
    r: Routed, s: Geometry, par: Parallel, dtype: str, capability: int, starts: Callable[[Parallel], bool]
) -> tuple[str, ...]:
    """For a layer that falls back: the layouts at which vLLM runs its
    preferred kernel for it and the whole recipe still starts (expert
    parallelism, a smaller TP size)."""
    ok = lambda p: _evaluate(r, s, p, dtype, capability).status == OK and starts(p)  # noqa: E731
    out = []
    ep = Parallel(par.tp, True, par.dp)
    if r.layer.kind == "experts" and not par.use_ep and ok(ep):
        kernel = _evaluate(r, s, ep, dtype, capability).kernel
        out.append(
            f"enable expert parallelism (vLLM --enable-expert-parallel, `plan --ep`): whole experts per rank, {kernel}"
        )
    smaller = next((t for t in range(par.tp - 1, 0, -1) if ok(Parallel(t, par.ep, par.dp))), None)
    if smaller is not None:
        out.append(f"use tensor_parallel_size {smaller} (`plan --tp {smaller}`)")
    return tuple(out)


def raise_on_failures(checks: Iterable[ShardCheck], par: Parallel) -> None:
    """One MixedError naming every failing group, its shard, the vLLM rule and
    the fixes."""
    parts = [
        f"layer group {c.group!r} ({c.layer}, {c.layers} layers, {c.format} from source {c.source!r}) would not "
        f"start: its per-rank shard is {c.shard} and {c.reason}. Fix: {', or '.join(c.fixes) or 'change the recipe'}"
        for c in checks
        if c.status == FAILS
    ]
    if parts:
        raise MixedError(f"at {par}, vLLM {KERNEL_RULES_RELEASE} (CUDA) rejects this recipe: " + "; ".join(parts))
