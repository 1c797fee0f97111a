"""The load plan: for every vLLM layer, the source it comes from, its format
there, and the exact checkpoint tensors (file, dtype, shape, bytes) to read.

Building the plan is where a recipe meets the checkpoints: sources must be the
same model, members of one fused layer must share a source, every planned
tensor must exist with the shape the model config implies and the dtype its
format requires. With ``read_headers=False`` only the configs are used (for
config-only directories such as ``--load-format dummy`` benchmarks).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_mixed.errors import MixedError
from vllm_mixed.formats import UNQUANTIZED, Format, TensorSpec, get_format
from vllm_mixed.formats.unquantized import FLOAT_DTYPES
from vllm_mixed.kernel_choice import AUTO, RECIPE, choose_linear_backend, choose_moe_backend
from vllm_mixed.models import Geometry, Layer, Member, geometry_for, layers_for, model_for
from vllm_mixed.parallel import HOPPER, Parallel
from vllm_mixed.recipe import Recipe
from vllm_mixed.safetensors_header import TensorInfo
from vllm_mixed.sources import Source
from vllm_mixed.tp_constraints import Routed, ShardCheck, check_layers

__all__ = [
    "LoadPlan", "PlannedLayer", "build_plan", "layer_format", "layer_tensors", "open_sources", "plan_summary",
    "predicted_methods", "pure_plan",
]  # fmt: skip


@dataclass(frozen=True)
class PlannedLayer:
    """One vLLM layer resolved: source, format there, tensors to read."""

    layer: Layer
    source: str
    format: str
    precision: str
    tensors: tuple[TensorInfo, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def fmt(self) -> Format:
        return get_format(self.format)


@dataclass
class LoadPlan:
    recipe: Recipe
    sources: dict[str, Source]
    layers: list[PlannedLayer]
    unused_rules: list[int] = field(default_factory=list)
    geometry: Geometry | None = None

    @property
    def base(self) -> Source:
        return self.sources[self.recipe.base]

    def routes(self) -> dict[str, str]:
        """vLLM layer name -> source name."""
        return {p.layer.name: p.source for p in self.layers}

    def bytes_by_precision(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for p in self.layers:
            out[p.precision] += p.nbytes
        return dict(out)

    def groups(self) -> list[tuple[str, str, str, str, str, int, int]]:
        """Rows (group, source, format, precision, layer kind, layer count,
        bytes), in model order."""
        rows: dict[tuple[str, str, str, str, str], list[int]] = {}
        for p in self.layers:
            key = (p.layer.group, p.source, p.format, p.precision, p.layer.kind)
            row = rows.setdefault(key, [0, 0])
            row[0] += 1
            row[1] += p.nbytes
        return [(*k, n, b) for k, (n, b) in rows.items()]

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.layers)

    def shard_checks(self, parallel: Parallel) -> list[ShardCheck]:
        """Every layer group's tensor-parallel shard against the kernel vLLM
        picks for it (see ``tp_constraints``); failing rows suggest fixes,
        including routing to another of the recipe's sources."""
        routed = [Routed(p.layer, p.source, p.format, self.sources[p.source].quant_config) for p in self.layers]
        others = {n: (s.format, s.quant_config) for n, s in self.sources.items()}
        geometry = self.geometry or geometry_for(self.base.config, "base config")
        return check_layers(geometry, routed, parallel, dtype=self.recipe.dtype, sources=others)

    def tensors_by_file(self) -> dict[str, list[tuple[str, TensorInfo]]]:
        """Shard path -> [(source name, tensor)] in file order: each file is
        opened once and read front to back."""
        out: dict[str, list[tuple[str, TensorInfo]]] = defaultdict(list)
        for p in self.layers:
            for t in p.tensors:
                out[str(t.file)].append((p.source, t))
        for items in out.values():
            items.sort(key=lambda st: st[1].start)
        return dict(out)


def open_sources(recipe: Recipe) -> dict[str, Source]:
    """Open every source and check they describe the same model."""
    sources = {name: Source(name, path) for name, path in recipe.sources.items()}
    base = sources[recipe.base]
    keys = model_for(base.config, f"base {base.name!r} ({base.path}/config.json)").model_keys
    for src in sources.values():
        for key in keys:
            a, b = base.config.get(key), src.config.get(key)
            if a != b:
                raise MixedError(
                    f"sources {base.name!r} and {src.name!r} are different models: config.json {key!r} is {a!r} in "
                    f"{base.path} but {b!r} in {src.path}; every source must be a checkpoint of the same model"
                )
    return sources


def build_plan(recipe: Recipe, sources: dict[str, Source] | None = None, read_headers: bool = True) -> LoadPlan:
    """Resolve every layer of the base model to a source and its tensors."""
    sources = sources or open_sources(recipe)
    where = f"base {recipe.base!r} ({sources[recipe.base].path}/config.json)"
    layers = layers_for(sources[recipe.base].config, where)
    used_rules: set[int] = set()
    planned = []
    for layer in layers:
        src = sources[_resolve(recipe, layer, used_rules)]
        planned.append(plan_layer(src, layer, layer_format(src, layer), read_headers))
    unused = [i for i in range(len(recipe.rules)) if i not in used_rules]
    return LoadPlan(recipe, sources, planned, unused, geometry_for(sources[recipe.base].config, where))


def plan_layer(src: Source, layer: Layer, fmt: str, read_headers: bool = True) -> PlannedLayer:
    """One layer from one source in format ``fmt``: its precision label and
    (with ``read_headers``) its checkpoint tensors, checked."""
    precision = get_format(fmt).precision(src.quant_config, _float_name(src.dtype))
    return PlannedLayer(layer, src.name, fmt, precision, layer_tensors(src, layer, fmt) if read_headers else ())


def pure_plan(recipe: Recipe, sources: dict[str, Source], name: str) -> LoadPlan:
    """The plan of the whole model from one source (for comparisons)."""
    return build_plan(recipe.only(name), sources)


def _resolve(recipe: Recipe, layer: Layer, used_rules: set[int]) -> str:
    """The one source of a layer; every fused member must agree."""
    picks: dict[str | None, list[tuple[str, int | None]]] = defaultdict(list)
    for m in layer.members:
        names = (m.name,) if m.name == layer.name else (m.name, layer.name)
        src, rule = recipe.source_for(names)
        if rule is not None:
            used_rules.add(rule)
        picks[src].append((m.name, rule))
    if len(picks) == 1:
        (src,) = picks
        if src is None:
            raise MixedError(
                f"layer {layer.name!r} matches no rule and the recipe has no 'default'; "
                "add 'default: <source>' or a rule whose targets match it"
            )
        return src
    parts = []
    for src, members in sorted(picks.items(), key=lambda kv: str(kv[0])):
        rules = sorted({f"rule {r}" if r is not None else "default" for _, r in members})
        if src is None:
            src, rules = "no source", ["no rule matches and the recipe has no 'default'"]
        shown = ", ".join(n for n, _ in members[:4])
        more = f" and {len(members) - 4} more" if len(members) > 4 else ""
        parts.append(f"{src} ({'/'.join(rules)}): {shown}{more}")
    raise MixedError(
        f"fused layer {layer.name!r} would mix sources: "
        + "; ".join(parts)
        + ". vLLM runs these members as one GEMM with one precision; make one rule cover the whole layer "
        f"(target {layer.name!r})"
    )


def layer_format(src: Source, layer: Layer) -> str:
    """The format a layer has in a source: quantizable layers take the
    source's format unless its format says the config leaves them in float."""
    fmt = get_format(src.format)
    if not layer.quantizable or not fmt.quantized or not fmt.converts(src.quant_config, layer, src.where):
        return UNQUANTIZED.name
    return src.format


def _float_name(dtype: str) -> str:
    return {"float16": "float16", "half": "float16", "float32": "float32"}.get(dtype, "bfloat16")


def _specs(src: Source, fmt: str, member: Member) -> dict[str, TensorSpec]:
    """A member's tensors in ``fmt``; a bias stays float in every format."""
    if len(member.shape) == 1:
        return {"weight": TensorSpec(FLOAT_DTYPES, member.shape)}
    specs = get_format(fmt).specs(member.shape[0], member.shape[1], src.quant_config)
    return {**specs, "bias": TensorSpec(FLOAT_DTYPES, member.shape[:1])} if member.bias else specs


def layer_tensors(src: Source, layer: Layer, fmt: str) -> tuple[TensorInfo, ...]:
    """The checkpoint tensors of a layer in ``src``, each checked against
    the spec its format and the model's shape give."""
    out = []
    for m in layer.members:
        try:
            specs = _specs(src, fmt, m)
        except MixedError as exc:  # a format's own shape rule (e.g. a group size that does not divide)
            raise MixedError(f"{src.where}: layer {layer.name!r}, member {m.name!r}: {exc}") from None
        for suffix, spec in specs.items():
            name = f"{m.name}.{suffix}"
            if not src.has(name):
                if spec.optional:
                    continue
                hint = get_format(fmt).missing_hint(suffix, src.quant_config)
                raise MixedError(
                    f"{src.where}: tensor {name!r} is in no shard, but layer {layer.name!r} routed to this source "
                    f"as {fmt} needs it; " + (f"{hint}; " if hint else "") + f"check the source is the "
                    f"{fmt.replace('_', ' ')} checkpoint of this model, or route the layer elsewhere"
                )
            info = src.tensor(name)
            if info.dtype not in spec.dtypes:
                raise MixedError(
                    f"{info.file}: tensor {name!r} is {info.dtype}, but source {src.name!r} is {src.format} and its "
                    f"{fmt} {suffix!r} must be {' or '.join(spec.dtypes)}; the file does not match its config.json "
                    "(wrong directory, or a checkpoint of another format)"
                )
            if info.shape != spec.shape:
                hint = get_format(fmt).shape_hint(suffix, info.shape, spec, src.quant_config)
                raise MixedError(
                    f"{info.file}: tensor {name!r} has shape {list(info.shape)} but the model config implies "
                    f"{list(spec.shape)} for {fmt}; "
                    + (hint or "the source is a different model or its config.json is wrong")
                )
            out.append(info)
    return tuple(out)


def predicted_methods(kind: str, fmt: str) -> tuple[str, str]:
    """(GPU method, CPU method) vLLM will run for a layer kind and format;
    "-" where vLLM uses no quantization method (embeddings, norms)."""
    if kind not in ("linear", "router", "experts"):
        return "-", "-"
    linear, moe = get_format(fmt).vllm_methods() if kind != "router" else UNQUANTIZED.vllm_methods()
    name = moe if kind == "experts" else linear
    return name, name


def plan_summary(
    plan: LoadPlan,
    pure: dict[str, LoadPlan],
    cpu_method: Callable[[str, str, dict[str, Any] | None], str] | None = None,
) -> dict[str, Any]:
    """Plain data for ``plan --json`` and the table. ``cpu_method(format,
    kind, quantization_config)`` names what vLLM's CPU build runs for a group
    on this machine (``cpu_kernels.cpu_method_name``, which asks vLLM);
    without it the CPU column names vLLM's own methods."""
    groups = []
    for g, s, f, p, kind, n, b in plan.groups():
        gpu, cpu = predicted_methods(kind, f)
        if cpu_method is not None and kind in ("linear", "experts", "router"):
            cpu = cpu_method(f, kind, plan.sources[s].quant_config)
        backend, linear = "-", "-"
        if kind == "experts":  # on Hopper, where the backend's package is installed (the engine checks)
            qc = plan.sources[s].quant_config
            backend = choose_moe_backend(get_format(f), s, plan.recipe, AUTO, HOPPER, lambda _: True, qc).describe()
        elif kind == "linear" and get_format(f).quantized:
            choice = choose_linear_backend(s, plan.recipe, AUTO)
            linear = choice.describe() if choice.by == RECIPE else "-"
        groups.append({"group": g, "source": s, "format": f, "precision": p, "layers": n, "bytes": b,
                       "vllm_method_gpu": gpu, "moe_backend_gpu": backend, "linear_backend_gpu": linear,
                       "vllm_method_cpu": cpu})  # fmt: skip
    return {
        "recipe": plan.recipe.to_dict(),
        "sources": {n: {"path": str(s.path), "format": s.format} for n, s in plan.sources.items()},
        "groups": groups,
        "bytes_by_precision": plan.bytes_by_precision(),
        "total_bytes": plan.total_bytes,
        "pure_sources": {n: p.total_bytes for n, p in pure.items()},
        "unused_rules": [
            {"index": i, "targets": plan.recipe.rules[i].targets, "source": plan.recipe.rules[i].source}
            for i in plan.unused_rules
        ],
        "tensors": sum(len(p.tensors) for p in plan.layers),
    }
