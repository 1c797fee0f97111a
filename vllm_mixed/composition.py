"""What the ``mixed`` quantization config carries into vLLM: the resolved
recipe, each source's path, format and own ``quantization_config``, and the
route (source, format) of every vLLM layer.

It is plain data so that it survives vLLM pickling the config into every
worker, and it needs no checkpoint weights: a composed ``config.json`` alone
is enough (``--load-format dummy`` benchmarks run from config-only dirs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_mixed.errors import MixedError
from vllm_mixed.recipe import Recipe, load_recipe, recipe_from_dict

__all__ = ["QUANT_METHOD", "Composition", "SourceEntry"]

QUANT_METHOD = "mixed"


@dataclass(frozen=True)
class SourceEntry:
    path: str
    format: str
    quantization_config: dict[str, Any] | None


@dataclass(frozen=True)
class Composition:
    recipe: Recipe
    sources: dict[str, SourceEntry]
    layers: dict[str, tuple[str, str]]  # vLLM layer name -> (source, format)

    @classmethod
    def from_plan(cls, plan: Any) -> Composition:
        sources = {n: SourceEntry(str(s.path), s.format, s.quant_config) for n, s in plan.sources.items()}
        return cls(plan.recipe, sources, {p.layer.name: (p.source, p.format) for p in plan.layers})

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "recipe": self.recipe.to_dict(),
            "sources": {
                n: {"path": s.path, "format": s.format, "quantization_config": s.quantization_config}
                for n, s in self.sources.items()
            },
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
                    n: SourceEntry(str(s["path"]), str(s["format"]), s.get("quantization_config"))
                    for n, s in data["sources"].items()
                }
                layers = {str(k): (str(v[0]), str(v[1])) for k, v in data["layers"].items()}
            except (KeyError, TypeError, IndexError) as exc:
                raise MixedError(
                    f"quantization_config 'mixed' is malformed ({exc!r}); re-run `vllm-mixed compose`"
                ) from None
            return cls(recipe, sources, layers)
        from vllm_mixed.plan import build_plan

        return cls.from_plan(build_plan(recipe, read_headers=False))

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
