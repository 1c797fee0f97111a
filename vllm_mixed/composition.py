"""What the ``mixed`` quantization config carries into vLLM: the resolved
recipe, each source's path, format and own ``quantization_config``, and the
route (source, format) of every vLLM layer.

It is plain data so that it survives vLLM pickling the config into every
worker, and it needs no checkpoint weights: a composed ``config.json`` alone
is enough (``--load-format dummy`` benchmarks run from config-only dirs).

``compose`` also records, per source, the identity of every shard the plan
reads (file size and sha256 of the header bytes); the loader checks it so that
a shard replaced after ``compose`` stops the load instead of serving another
model's weights. A composition without these records (the ``{"recipe": path}``
form) skips the check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_mixed.errors import MixedError
from vllm_mixed.recipe import Recipe, load_recipe, recipe_from_dict
from vllm_mixed.safetensors_header import ShardIdentity, shard_identity
from vllm_mixed.sources import FORMAT_NAMES

if TYPE_CHECKING:
    from vllm_mixed.plan import LoadPlan

__all__ = ["QUANT_METHOD", "Composition", "SourceEntry"]

QUANT_METHOD = "mixed"


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
    layers: dict[str, tuple[str, str]]  # vLLM layer name -> (source, format)

    @classmethod
    def from_plan(cls, plan: Any) -> Composition:
        """The composition of a plan; a plan with headers read also records
        the identity of every shard it reads."""
        read: dict[str, set[Path]] = {n: set() for n in plan.sources}
        for p in plan.layers:
            read[p.source].update(Path(t.file) for t in p.tensors)
        recorded = any(read.values())
        sources = {
            n: SourceEntry(str(s.path), s.format, s.quant_config, _identities(read[n]) if recorded else None)
            for n, s in plan.sources.items()
        }
        return cls(plan.recipe, sources, {p.layer.name: (p.source, p.format) for p in plan.layers})

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
            "layers": {name: list(route) for name, route in self.layers.items()},
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
                sources = {
                    n: SourceEntry(str(s["path"]), str(s["format"]), s.get("quantization_config"), _parse_files(s))
                    for n, s in data["sources"].items()
                }
                layers = {str(k): (str(v[0]), str(v[1])) for k, v in data["layers"].items()}
                _check_routes(sources, layers)
            except (KeyError, TypeError, IndexError, ValueError) as exc:
                raise MixedError(
                    f"quantization_config 'mixed' is malformed ({exc!r}); re-run `vllm-mixed compose`"
                ) from None
            return cls(recipe, sources, layers)
        from vllm_mixed.plan import build_plan

        return cls.from_plan(build_plan(recipe, read_headers=False))

    def replan(self) -> LoadPlan:
        """The load plan on the files now on disk (what the loader reads),
        checked against what ``compose`` recorded: the same shards (identity)
        and the same route for every layer."""
        from vllm_mixed.plan import build_plan

        try:
            plan = build_plan(self.recipe)  # re-validates every header
        except MixedError as exc:
            self.check_files(found=exc)  # a shard replaced since compose: say so, with what re-planning found
            raise
        self.check_files()  # same tensors, but moved, added or re-typed since compose
        routed = {p.layer.name: (p.source, p.format) for p in plan.layers}
        if routed != self.layers:
            changed = sorted(k for k in set(routed) | set(self.layers) if routed.get(k) != self.layers.get(k))
            raise MixedError(
                f"the sources no longer match the composed plan (first changed layer: {changed[0]!r}); "
                "re-run `vllm-mixed compose`"
            )
        return plan

    def changed_files(self) -> list[tuple[Path, str]]:
        """Recorded shards that differ on disk now from what ``compose`` saw,
        as (path, what changed); empty when none changed or none was recorded."""
        out = []
        for src in self.sources.values():
            for fname, then in sorted((src.files or {}).items()):
                path = Path(src.path) / fname
                now = shard_identity(path)
                if now is None:
                    out.append((path, "the file is missing"))
                elif now.nbytes != then.nbytes:
                    out.append((path, f"it was {then.nbytes} bytes at compose, now {now.nbytes}"))
                elif now.header_sha256 != then.header_sha256:
                    out.append((
                        path,
                        f"its safetensors header changed (sha256 {then.header_sha256[:12]}... at compose, now "
                        f"{now.header_sha256[:12]}...), so a tensor was added, removed, renamed, re-typed, reshaped "
                        "or moved",
                    ))  # fmt: skip
        return out

    def check_files(self, found: MixedError | None = None) -> None:
        """Raise if a shard changed since ``compose``, naming the file and what
        changed; ``found`` is what re-planning on the current files reported
        (it names the tensor) and is kept in the message."""
        changes = self.changed_files()
        if not changes:
            return
        path, what = changes[0]
        more = f" (and {len(changes) - 1} more changed shards)" if len(changes) > 1 else ""
        detail = ""
        if found is not None:  # what re-planning found, usually about the same file (then named once)
            detail = "; " + str(found).removeprefix(f"{path}: ")
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
                "the recipe's base checkpoint, re-run `vllm-mixed compose`"
            )
        return route

    def quantized_modules(self, source: str) -> list[str]:
        """Module names (without the ``model.layers.N.`` prefix) routed to
        ``source`` in its quantized format, e.g. ``self_attn.q_proj``."""
        out = set()
        for name, (src, fmt) in self.layers.items():
            if src == source and fmt != "unquantized":
                out.add(re.sub(r"^model\.layers\.\d+\.", "", name))
        expanded = set()
        for name in out:
            if name.endswith("qkv_proj"):
                expanded.update(name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj"))
            else:
                expanded.add(name)
        return sorted(expanded)


def _identities(files: set[Path]) -> dict[str, ShardIdentity]:
    out = {}
    for f in sorted(files):
        ident = shard_identity(f)
        if ident is None:
            raise MixedError(f"{f}: shard file is missing; restore it or re-download the checkpoint")
        out[f.name] = ident
    return out


def _check_routes(sources: dict[str, SourceEntry], layers: dict[str, tuple[str, str]]) -> None:
    """Formats and routes are looked up in fixed tables, never used as names
    of code: anything else is refused here."""
    for name, src in sources.items():
        if src.format not in FORMAT_NAMES:
            raise ValueError(f"source {name!r} has format {src.format!r}, not one of {', '.join(FORMAT_NAMES)}")
        if src.quantization_config is not None and not isinstance(src.quantization_config, dict):
            raise TypeError(f"source {name!r}: quantization_config must be an object or null")
    for layer, (src_name, fmt) in layers.items():
        if src_name not in sources or fmt not in FORMAT_NAMES:
            raise ValueError(
                f"layer {layer!r} routes to source {src_name!r} as {fmt!r}, which is not a listed source/format"
            )


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
