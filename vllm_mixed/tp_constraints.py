"""Whether the kernel vLLM 0.26 (CUDA) picks for each tensor-parallel shard of
a planned layer accepts it, and what vLLM falls back to when it does not.

Pure arithmetic over the model's config.json shape and each source's own
``quantization_config`` (no torch, no vLLM), so ``plan --tp N`` can say before
any GPU is involved whether an engine start would fail, and the engine
(``MixedPrecisionConfig.get_quant_method``) runs the same rules before the
first weight is allocated. Every rule restates one check in vLLM 0.26.0's
sources, named as ``file:function`` (paths under ``vllm/``); the CPU build
0.32 has the same checks. The GPU is taken to be a Hopper (sm90) unless a
capability is passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vllm_mixed.architectures import Layer
from vllm_mixed.errors import MixedError
from vllm_mixed.methods import predicted_methods

__all__ = ["FAILS", "FALLBACK", "HOPPER", "OK", "Parallel", "Routed", "ShardCheck", "check_layers", "raise_on_failures"]

OK, FALLBACK, FAILS = "ok", "fallback", "fails"
HOPPER = 90


@dataclass(frozen=True)
class Parallel:
    """How vLLM shards the model. ``dp`` counts data-parallel (times
    prefill-context-parallel) ranks: without expert parallelism vLLM's MoE
    shards every expert over all dp*tp ranks
    (fused_moe/config.py:FusedMoEParallelConfig.flatten_tp_across_dp_and_pcp)."""

    tp: int = 1
    ep: bool = False
    dp: int = 1

    @property
    def use_ep(self) -> bool:
        """fused_moe/config.py:FusedMoEParallelConfig.make: EP needs more than one rank."""
        return self.ep and self.tp * self.dp > 1

    @property
    def moe_tp(self) -> int:
        """Ranks each expert is split over (1 with EP: whole experts per rank)."""
        return 1 if self.use_ep else self.tp * self.dp

    def __str__(self) -> str:
        extra = (f", data_parallel_size {self.dp}" if self.dp > 1 else "") + (", expert parallel" if self.ep else "")
        return f"tensor_parallel_size {self.tp}{extra}"


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
class _Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    inter: int
    vocab: int

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> _Shape:
        heads = int(cfg["num_attention_heads"])
        return cls(
            int(cfg["hidden_size"]), heads, int(cfg["num_key_value_heads"]),
            int(cfg.get("head_dim") or cfg["hidden_size"] // heads), int(cfg["num_experts"]),
            int(cfg["moe_intermediate_size"]), int(cfg["vocab_size"]),
        )  # fmt: skip


@dataclass(frozen=True)
class _Verdict:
    shard: str
    kernel: str
    status: str = OK
    reason: str = ""


# --- model-level splits: every precision -------------------------------------------------


def _attention_split(s: _Shape, par: Parallel) -> str | None:
    """config/model.py:ModelConfig.verify_with_parallel_config (heads % tp);
    models/qwen3_moe.py:Qwen3MoeAttention.__init__ and layers/linear.py:
    QKVParallelLinear.__init__: KV heads are split when there are at least tp
    of them, else replicated, tp a multiple of their count."""
    if s.heads % par.tp:
        return (
            f"{s.heads} attention heads are not divisible by {par.tp} ranks (ModelConfig.verify_with_parallel_config)"
        )
    if s.kv_heads >= par.tp and s.kv_heads % par.tp:
        return f"{s.kv_heads} KV heads are not divisible by {par.tp} ranks (Qwen3MoeAttention.__init__ asserts)"
    if s.kv_heads < par.tp and par.tp % s.kv_heads:
        return (
            f"{par.tp} ranks are not a multiple of the {s.kv_heads} KV heads to replicate (QKVParallelLinear.__init__)"
        )
    return None


def _experts_split(s: _Shape, par: Parallel) -> str | None:
    """models/qwen3_moe.py:Qwen3MoeSparseMoeBlock.__init__ (tp <= experts);
    fused_moe/config.py:FusedMoEConfig.__post_init__ asserts the intermediate
    size splits evenly over the MoE ranks."""
    if par.tp > s.experts:
        return (
            f"tensor_parallel_size {par.tp} is greater than the {s.experts} experts (Qwen3MoeSparseMoeBlock.__init__)"
        )
    if s.inter % par.moe_tp:
        return (
            f"moe_intermediate_size {s.inter} is not divisible by {par.moe_tp} MoE ranks (FusedMoEConfig.__post_init__)"
        )
    return None


def _vocab_split(s: _Shape, par: Parallel) -> str | None:
    """layers/vocab_parallel_embedding.py: the vocabulary, padded to a multiple
    of 64 (pad_vocab_size), is divided evenly (vocab_range_from_global_vocab_size)."""
    padded = -(-s.vocab // 64) * 64
    if padded % par.tp:
        return f"the padded vocabulary {padded} is not divisible by {par.tp} ranks (vocab_range_from_global_vocab_size)"
    return None


# --- linear layers -----------------------------------------------------------------------


@dataclass(frozen=True)
class _LinearShard:
    k_full: int
    k: int  # input features per rank
    parts: tuple[int, ...]  # output features per rank, per fused member
    row_split: bool
    col_split: bool
    note: str = ""

    @property
    def n(self) -> int:
        return sum(self.parts)

    def __str__(self) -> str:
        return f"[{self.k} -> {'+'.join(map(str, self.parts))}]{self.note}"


def _linear_shard(s: _Shape, par: Parallel, layer: Layer) -> _LinearShard:
    """QKVParallelLinear (q split, KV split or replicated), RowParallelLinear
    (o_proj: input split), ColumnParallelLinear (output split); router and
    other replicated linears are not split."""
    tp, role = par.tp, layer.name.rsplit(".", 1)[-1]
    if layer.kind == "router":
        out, k = layer.members[0].shape
        return _LinearShard(k, k, (out,), False, False, " replicated")
    if role == "qkv_proj":
        kv = max(1, s.kv_heads // tp) * s.head_dim
        note = f" (KV heads replicated x{tp // s.kv_heads})" if tp > s.kv_heads else ""
        return _LinearShard(s.hidden, s.hidden, (s.heads // tp * s.head_dim, kv, kv), False, tp > 1, note)
    if role in ("o_proj", "down_proj"):
        out, k = layer.members[0].shape
        return _LinearShard(k, k // tp, (out,), tp > 1, False)
    k = layer.members[0].shape[1]
    return _LinearShard(k, k, tuple(m.shape[0] // tp for m in layer.members), False, tp > 1)


def _fp8_linear(sh: _LinearShard, qc: dict[str, Any], dtype: str, capability: int) -> tuple[str, str, str]:
    """quantization/utils/fp8_utils.py:validate_fp8_block_shape, called by
    Fp8LinearMethod.create_weights: a row-parallel shard's input and every
    column-parallel (or fused) output part must be whole FP8 blocks. The
    plugin's config has no weight_block_size, so linear.py's
    _maybe_allow_fp8_block_shape_mismatch never relaxes it."""
    bn, bk = (qc.get("weight_block_size") or [128, 128])[:2]
    kernel = "Fp8LinearMethod (block FP8 GEMM)"
    rule = "fp8_utils.validate_fp8_block_shape"
    if sh.row_split and sh.k % bk:
        return kernel, FAILS, f"input_size_per_partition {sh.k} is not a multiple of FP8 block_k {bk} ({rule})"
    for part in sh.parts if sh.col_split else sh.parts[:-1]:
        if part % bn:
            return kernel, FAILS, f"output partition {part} is not a multiple of FP8 block_n {bn} ({rule})"
    return kernel, OK, ""


def _int4_linear(sh: _LinearShard, qc: dict[str, Any], dtype: str, capability: int) -> tuple[str, str, str]:
    """kernels/linear/__init__.py:choose_mp_linear_kernel takes the first of
    its CUDA list whose can_implement accepts the shard (AllSpark: Ampere and
    channelwise only; Conch: optional package, absent from the CUDA wheel):
    MacheteLinearKernel (sm90 only; K % 64, N % 128, machete_utils.
    check_machete_supports_shape), MarlinLinearKernel (without act-order only a
    quant group straddling ranks is refused, tile misalignment is padded; with
    it marlin_utils.check_marlin_supports_shape: N % 64, K % 128),
    ExllamaLinearKernel (fp16 only), TritonW4A16LinearKernel. A quant group
    straddling ranks is refused even where Machete would take it:
    auto_gptq.py:AutoGPTQLinearMethod.create_weights then allocates
    K // group scale rows per rank, and the scales load silently wrong."""
    g = int(qc.get("group_size", 128))
    act_order = bool(qc.get("desc_act")) and g != -1  # AutoGPTQConfig.__init__
    k, n, split_k = sh.k, sh.n, sh.k != sh.k_full
    whole_groups = g == -1 or g >= sh.k_full or k % g == 0
    if not whole_groups:
        why = (
            f"input_size_per_partition {k} is not a whole number of quant groups of {g}: Marlin and Triton refuse "
            "it (can_implement), and AutoGPTQLinearMethod.create_weights would load its scales wrong"
        )
        return "AutoGPTQLinearMethod", FAILS, why
    candidates = [  # in choose_mp_linear_kernel's order, with whole groups per rank
        ("Machete", capability == HOPPER and not (act_order and split_k) and g in (-1, 64, 128)
         and k % 64 == 0 and n % 128 == 0),
        ("Marlin", g in (-1, 32, 64, 128) and (not act_order or (n % 64 == 0 and k % 128 == 0))),
        ("Exllama", dtype == "float16" and not (act_order and split_k) and n % 8 == 0 and g > 0),
        ("TritonW4A16", n % 8 == 0 and not act_order and (g in (-1, 32, 64, 128, 256) or g == sh.k_full)),
    ]  # fmt: skip
    preferred = candidates[0][0] if capability == HOPPER else candidates[1][0]
    for name, accepts in candidates:
        if accepts:
            status = OK if name == preferred else FALLBACK
            why = "" if status == OK else f"{preferred} does not accept [{k} -> {n}] with group {g}"
            return f"AutoGPTQLinearMethod: {name}", status, why
    return "AutoGPTQLinearMethod", FAILS, f"no int4 kernel accepts [{k} -> {n}] (choose_mp_linear_kernel raises)"


# --- MoE experts -------------------------------------------------------------------------


def _fp8_moe(inter: int, s: _Shape, par: Parallel, qc: dict[str, Any]) -> tuple[str, str, str]:
    """quantization/fp8.py:Fp8MoEMethod.create_weights: the per-rank
    intermediate size must be whole blocks of block_n, and of block_k once the
    global tensor-parallel size is above 1."""
    bn, bk = (qc.get("weight_block_size") or [128, 128])[:2]
    for block, name, applies in ((bn, "block_n", True), (bk, "block_k", par.tp > 1)):
        if applies and inter % block:
            why = f"intermediate_size_per_partition {inter} is not a multiple of FP8 {name} {block}"
            return "Fp8MoEMethod", FAILS, f"{why} (Fp8MoEMethod.create_weights)"
    return "Fp8MoEMethod", OK, ""


def _int4_moe(inter: int, s: _Shape, par: Parallel, qc: dict[str, Any]) -> tuple[str, str, str]:
    """quantization/auto_gptq.py:AutoGPTQConfig.get_quant_method runs Marlin
    MoE when marlin_utils.check_moe_marlin_supports_layer accepts the layer
    (hidden % 128, group in -1/32/64/128, and with allow_tile_padding=not
    desc_act: intermediate per rank % group; with act-order % max(64, group)),
    else MoeWNA16Config(full_config).get_quant_method: moe_wna16.py:
    MoeWNA16Method.create_weights halves the group size until it divides both
    sizes and asserts it stays >= 32."""
    g = int(qc.get("group_size", 128))
    act_order = bool(qc.get("desc_act")) and g != -1
    tile = max(64, g) if act_order else g
    if g in (-1, 32, 64, 128) and s.hidden % 128 == 0 and (g <= 0 or inter % tile == 0):
        pad = "" if act_order or inter % 64 == 0 else " (intermediate tile-padded, marlin_moe_padded_intermediate)"
        return f"AutoGPTQMoEMethod: Marlin MoE{pad}", OK, ""
    why = f"Marlin MoE needs intermediate_size_per_partition {inter} % {tile} == 0 (check_moe_marlin_supports_layer)"
    wg = g
    while wg > 0 and (inter % wg or s.hidden % wg):
        wg //= 2
        if wg < 32:
            why += f", and MoeWNA16Method.create_weights asserts a regrouped group size >= 32 ({wg} here)"
            return "MoeWNA16Method", FAILS, why
    why += (
        "; measured on an H100 with vLLM 0.26, the MoE-WNA16 Triton kernel gave 44 % less output throughput than "
        "Marlin at 256 sequences and took 29 % longer per token at batch 1 (benchmarks/RESULTS.md)"
    )
    return f"MoeWNA16Method (Triton, group {wg})", FALLBACK, why


_LINEAR_RULES = {"fp8_block": _fp8_linear, "gptq_int4": _int4_linear}
_MOE_RULES = {"fp8_block": _fp8_moe, "gptq_int4": _int4_moe}


def _evaluate(r: Routed, s: _Shape, par: Parallel, dtype: str, capability: int) -> _Verdict:
    """The shard of one layer at ``par`` and what vLLM does with it."""
    kind, qc = r.layer.kind, r.quant_config or {}
    method = predicted_methods(kind, r.format)[0]
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
            return _Verdict(shard, method, FAILS, failed)
        rule = _MOE_RULES.get(r.format)
        return _Verdict(shard, *(rule(inter, s, par, qc) if rule else (method, OK, "")))
    failed = _attention_split(s, par) if r.layer.group == "attention" else None
    if failed:
        return _Verdict("-", method, FAILS, failed)
    sh = _linear_shard(s, par, r.layer)
    rule = _LINEAR_RULES.get(r.format)
    return _Verdict(str(sh), *(rule(sh, qc, dtype, capability) if rule else (method, OK, "")))


def _pattern(layer: Layer) -> str:
    if layer.kind == "norm":
        return "all norms"
    return re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", layer.name)


def check_layers(
    cfg: dict[str, Any],
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
    s = _Shape.of(cfg)
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
    r: Routed, s: _Shape, par: Parallel, smaller: int | None, dtype: str, capability: int, sources: dict[str, Any]
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
        if fmt != r.format and (r.layer.quantizable or fmt == "unquantized") and works(alt, par):
            kernel = _evaluate(alt, s, par, dtype, capability).kernel
            out.append(f"route {_pattern(r.layer)!r} to source {name!r} ({fmt}: {kernel})")
    return tuple(out)


def _preferred(
    r: Routed, s: _Shape, par: Parallel, dtype: str, capability: int, starts: Callable[[Parallel], bool]
) -> tuple[str, ...]:
    """For a layer that falls back: the layouts at which vLLM runs its
    preferred kernel for it and the whole recipe still starts (expert
    parallelism, a smaller TP size)."""
    ok = lambda p: _evaluate(r, s, p, dtype, capability).status == OK and starts(p)  # noqa: E731
    out = []
    ep = Parallel(par.tp, True, par.dp)
    if r.layer.kind == "experts" and not par.use_ep and ok(ep):
        kernel = _evaluate(r, s, ep, dtype, capability).kernel
        out.append(f"enable expert parallelism (vLLM --enable-expert-parallel, `plan --ep`): whole experts per rank, {kernel}")
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
        raise MixedError(f"at {par}, vLLM 0.26 (CUDA) rejects this recipe: " + "; ".join(parts))
