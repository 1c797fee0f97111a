"""What the ``mixed`` quantization config carries into vLLM, and what the
engine uses as written: the resolved recipe, each source's path, format and
own ``quantization_config``, the model's geometry, and every vLLM layer with
its route (source, format), kind, parallel style and fused members.

It is plain data so that it survives vLLM pickling the config into every
worker, and it needs no checkpoint weights: a composed ``config.json`` alone
is enough (``--load-format dummy`` benchmarks run from config-only dirs).

``compose`` also records, per source, the identity of every shard the plan
reads (file size and sha256 of the header bytes). The loader does not plan
again from the recipe: :meth:`Composition.verified_plan` reads each recorded
shard's header once, which gives both the tensors to read and the identity to
compare, so a shard replaced after ``compose`` stops the load instead of
serving another model's weights. A composition without these records (the
``{"recipe": path}`` form) skips the comparison.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_mixed.errors import MixedError
from vllm_mixed.formats import FORMAT_NAMES, get_format
from vllm_mixed.models.base import Geometry, Layer
from vllm_mixed.recipe import Recipe, load_recipe, recipe_from_dict
from vllm_mixed.safetensors_header import ShardIdentity, shard_identity

if TYPE_CHECKING:
    from vllm_mixed.plan import LoadPlan

__all__ = ["QUANT_METHOD", "Composition", "SourceEntry"]

QUANT_METHOD = "mixed"
_REFIX = "re-run `vllm-mixed compose`"


@dataclass(frozen=True)
class SourceEntry:
    path: str
    format: str
    quantization_config: dict[str, Any] | None
    # shard file name -> its identity when composed; None: not recorded (no check).
    # Provenance, not routing: two compositions of one recipe compare equal.
    files: dict[str, ShardIdentity] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Composition:
    recipe: Recipe
    sources: dict[str, SourceEntry]
    layers: dict[str, tuple[str, str]]  # vLLM layer name -> (source, format), model order
    table: dict[str, Layer]  # vLLM layer name -> the layer (kind, parallel style, members)
    geometry: Geometry

    @classmethod
    def from_plan(cls, plan: LoadPlan) -> Composition:
        """The composition of a plan; a plan with headers read also records
        the identity of every shard it reads (from the same header reads)."""
        read: dict[str, set[Path]] = {n: set() for n in plan.sources}
        for p in plan.layers:
            read[p.source].update(Path(t.file) for t in p.tensors)
        recorded = any(read.values())
        sources = {
            n: SourceEntry(
                str(s.path), s.format, s.quant_config,
                {f.name: s.read_shard(f)[1] for f in sorted(read[n])} if recorded else None,
            )
            for n, s in plan.sources.items()
        }  # fmt: skip
        routes = {p.layer.name: (p.source, p.format) for p in plan.layers}
        geometry = plan.geometry
        if geometry is None:
            raise ValueError("a plan without geometry cannot be composed")
        return cls(plan.recipe, sources, routes, {p.layer.name: p.layer for p in plan.layers}, geometry)

    def to_dict(self) -> dict[str, Any]:
        sources: dict[str, Any] = {}
        for n, s in self.sources.items():
            sources[n] = {"path": s.path, "format": s.format, "quantization_config": s.quantization_config}
            if s.files is not None:
                sources[n]["files"] = {
                    f: {"bytes": i.nbytes, "header_sha256": i.header_sha256} for f, i in s.files.items()
                }
        return {
            "quant_method": QUANT_METHOD,
            "recipe": self.recipe.to_dict(),
            "sources": sources,
            "geometry": self.geometry.to_dict(),
            "layers": {
                name: {"source": src, "format": fmt, **self.table[name].to_dict()}
                for name, (src, fmt) in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Composition:
        """Accepts what ``compose`` writes, or a minimal
        ``{"quant_method": "mixed", "recipe": "/path/recipe.yaml"}`` (as
        ``--hf-overrides`` would pass), which is resolved from the sources'
        config.json files."""
        method = str(data.get("quant_method", "")).lower()
        if method != QUANT_METHOD:
            raise MixedError(
                f"quantization 'mixed' needs a recipe, but the model's quantization_config is a {method or 'plain'!r} "
                "checkpoint config; serve a directory written by `vllm-mixed compose RECIPE -o DIR`, or pass "
                '--hf-overrides \'{"quantization_config": {"quant_method": "mixed", "recipe": "/abs/recipe.yaml"}}\''
            )
        raw = data.get("recipe")
        if isinstance(raw, str):
            recipe = load_recipe(Path(raw))
        elif isinstance(raw, dict):
            recipe = recipe_from_dict(raw)
        else:
            raise MixedError("quantization_config of quant_method 'mixed' has no 'recipe' (a recipe path or mapping)")
        if "layers" in data and "sources" in data:
            try:
                return cls._parse(recipe, data)
            except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
                raise MixedError(f"quantization_config 'mixed' is malformed ({exc!r}); {_REFIX}") from None
        from vllm_mixed.plan import build_plan

        return cls.from_plan(build_plan(recipe, read_headers=False))

    @classmethod
    def _parse(cls, recipe: Recipe, data: dict[str, Any]) -> Composition:
        """What ``to_dict`` wrote; formats and routes are looked up in fixed
        tables, never used as names of code: anything else is refused."""
        sources = {}
        for n, s in data["sources"].items():
            if s["format"] not in FORMAT_NAMES:
                raise ValueError(f"source {n!r} has format {s['format']!r}, not one of {', '.join(FORMAT_NAMES)}")
            qc = s.get("quantization_config")
            if qc is not None and not isinstance(qc, dict):
                raise TypeError(f"source {n!r}: quantization_config must be an object or null")
            sources[n] = SourceEntry(str(s["path"]), str(s["format"]), qc, _parse_files(s))
        routes, table = {}, {}
        for name, entry in data["layers"].items():
            src, fmt = entry["source"], entry["format"]
            if src not in sources or fmt not in FORMAT_NAMES:
                raise ValueError(
                    f"layer {name!r} routes to source {src!r} as {fmt!r}, which is not a listed source/format"
                )
            routes[str(name)] = (str(src), str(fmt))
            table[str(name)] = Layer.from_dict(str(name), entry)
        return cls(recipe, sources, routes, table, Geometry.from_dict(data["geometry"]))

    def verified_plan(self) -> LoadPlan:
        """The load plan of exactly the composed layers, on the files now on
        disk: each recorded shard's header is read once, giving its tensors
        and its identity, which must equal what ``compose`` recorded."""
        from vllm_mixed.plan import LoadPlan, plan_layer
        from vllm_mixed.sources import Source

        sources = {}
        for name, entry in self.sources.items():
            src = sources[name] = Source(name, entry.path)
            if src.format != entry.format:
                raise MixedError(
                    f"source {name!r} ({src.path}): its config.json now declares {src.format}, but it was composed as "
                    f"{entry.format}; restore the checkpoint, or {_REFIX} to plan against it"
                )
        changes = self._changes(lambda n, path: _read_identity(sources[n], path))
        try:
            layers = [plan_layer(sources[s], self.table[name], fmt) for name, (s, fmt) in self.layers.items()]
        except MixedError as exc:
            if changes:
                self._raise_changed(changes, found=exc)
            raise
        self._raise_changed(changes)
        return LoadPlan(self.recipe, sources, layers, [], self.geometry)

    def changed_files(self) -> list[tuple[Path, str]]:
        """Recorded shards that differ on disk now from what ``compose`` saw,
        as (path, what changed); empty when none changed or none was recorded."""
        return self._changes(lambda _n, path: shard_identity(path))

    def check_files(self, found: MixedError | None = None) -> None:
        """Raise if a shard changed since ``compose``, naming the file and what
        changed; ``found`` is what planning on the current files reported (it
        names the tensor) and is kept in the message."""
        self._raise_changed(self.changed_files(), found)

    def _changes(self, identity_of: Any) -> list[tuple[Path, str]]:
        out = []
        for name, src in self.sources.items():
            for fname, then in sorted((src.files or {}).items()):
                path = Path(src.path) / fname
                what = _difference(then, identity_of(name, path))
                if what:
                    out.append((path, what))
        return out

    @staticmethod
    def _raise_changed(changes: list[tuple[Path, str]], found: MixedError | None = None) -> None:
        if not changes:
            return
        path, what = changes[0]
        more = f" (and {len(changes) - 1} more changed shards)" if len(changes) > 1 else ""
        detail = "; " + str(found).removeprefix(f"{path}: ") if found is not None else ""
        raise MixedError(
            f"{path}: replaced or modified since `vllm-mixed compose`: {what}{more}{detail}. Restore the shard "
            "compose read, or, if the new files are intended, re-run `vllm-mixed compose RECIPE -o DIR` to plan "
            "against them"
        ) from None  # ``found`` is in the message; one error, not two chained tracebacks

    def route(self, prefix: str) -> tuple[str, str]:
        """(source, format) of a vLLM layer prefix."""
        route = self.layers.get(prefix)
        if route is None:
            raise MixedError(
                f"layer {prefix!r} is not in the composed plan ({len(self.layers)} layers); the model differs from "
                f"the recipe's base checkpoint, {_REFIX}"
            )
        return route

    def quantized_modules(self, source: str) -> list[str]:
        """The checkpoint modules of the linear layers routed to ``source`` in
        its quantized format, without the ``model.layers.N.`` prefix (e.g.
        ``self_attn.q_proj``): from the stored fused members."""
        out = set()
        for name, (src, fmt) in self.layers.items():
            layer = self.table[name]
            if src == source and layer.kind == "linear" and get_format(fmt).quantized:
                out.update(re.sub(r"^model\.layers\.\d+\.", "", m.name) for m in layer.members)
        return sorted(out)


def _read_identity(src: Any, path: Path) -> ShardIdentity | None:
    """The identity from the one header read that also gives the tensors; a
    header too damaged to parse is still hashed (to say what changed)."""
    try:
        return src.read_shard(path)[1]
    except MixedError:
        return shard_identity(path)


def _difference(then: ShardIdentity, now: ShardIdentity | None) -> str:
    if now is None:
        return "the file is missing"
    if now.nbytes != then.nbytes:
        return f"it was {then.nbytes} bytes at compose, now {now.nbytes}"
    if now.header_sha256 != then.header_sha256:
        return (
            f"its safetensors header changed (sha256 {then.header_sha256[:12]}... at compose, now "
            f"{now.header_sha256[:12]}...), so a tensor was added, removed, renamed, re-typed, reshaped or moved"
        )
    return ""


def _parse_files(entry: dict[str, Any]) -> dict[str, ShardIdentity] | None:
    """Recorded shard identities of one source (None for compositions written
    before they were recorded)."""
    raw = entry.get("files")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f"files must map shard file names to identities, got {type(raw).__name__}")
    out = {}
    for fname, ident in raw.items():
        if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
            raise ValueError(f"shard name {fname!r} is not a file name")
        nbytes, digest = ident["bytes"], ident["header_sha256"]
        if not isinstance(nbytes, int) or not isinstance(digest, str):
            raise TypeError(f"shard {fname!r}: bytes and header_sha256 must be an integer and a string")
        out[str(fname)] = ShardIdentity(nbytes, digest)
    return out
