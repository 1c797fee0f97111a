"""The recipe: which checkpoint each layer of the model comes from.

A recipe is YAML with five keys (``sources``, ``base``, ``default``, ``dtype``,
``rules``) and an optional sixth, ``kernels`` (the vLLM backend per source,
overriding the plugin's measured choice, see ``kernel_choice``). It is parsed into a frozen, typed :class:`Recipe`; unknown keys are
rejected and every error names the file, the key, the value and the fix.

Matching semantics (stated once, tested in ``tests/test_recipe.py``): a target
is a glob on vLLM layer names (``model.layers.*.mlp.experts``) or, with the
``re:`` prefix, a regular expression that must match the whole name. A target
may also name one checkpoint member of a fused layer (``q_proj``,
``experts.7.up_proj``). Rules are tried in file order; the first match wins;
layers that no rule matches come from ``default``.
"""

from __future__ import annotations

import fnmatch
import re
import reprlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator, model_validator

from vllm_mixed.errors import MixedError

__all__ = ["Recipe", "Rule", "SourceKernels", "load_recipe", "recipe_from_dict", "target_matches"]

DTYPES = ("bfloat16", "float16")


class Rule(BaseModel):
    """Layers matching any of ``targets`` come from ``source``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[StrictStr] = Field(min_length=1)
    source: StrictStr

    @field_validator("targets")
    @classmethod
    def _targets_compile(cls, targets: list[str]) -> list[str]:
        for target in targets:
            if not target.strip():
                raise ValueError("a target is empty; write a layer name, a glob or 're:<regex>'")
            if target.startswith("re:"):
                try:
                    re.compile(target[3:])
                except re.error as exc:
                    raise ValueError(f"target {target!r} is not a valid regular expression ({exc})") from None
        return targets


class SourceKernels(BaseModel):
    """The vLLM kernel backends asked for the layers of one source (CUDA)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: vLLM's ``--moe-backend`` value for this source's experts (``auto``: vLLM's own choice)
    moe_backend: StrictStr | None = None
    #: vLLM's ``--linear-backend`` value for this source's quantized linears (``auto``: vLLM's own choice)
    linear_backend: StrictStr | None = None

    @field_validator("moe_backend", "linear_backend")
    @classmethod
    def _backend_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(
                f"{name!r} is not a vLLM backend name (MoE: marlin, humming, triton, ...; linear: machete, marlin, "
                "cutlass, deep_gemm, torch, ...; or auto)"
            )
        return name


class Recipe(BaseModel):
    """A validated recipe. Source paths are absolute once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # strict: a YAML ``!!binary`` value is bytes, not a path (and would skip resolution)
    sources: dict[str, StrictStr] = Field(min_length=1)
    base: StrictStr
    default: StrictStr | None = None
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    rules: list[Rule] = Field(default_factory=list)
    kernels: dict[str, SourceKernels] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_exist(self) -> Recipe:
        known = ", ".join(sorted(self.sources))
        if self.base not in self.sources:
            raise ValueError(f"base: {self.base!r} is not a source; use one of: {known}")
        if self.default is not None and self.default not in self.sources:
            raise ValueError(f"default: {self.default!r} is not a source; use one of: {known}")
        for i, rule in enumerate(self.rules):
            if rule.source not in self.sources:
                raise ValueError(
                    f"rules[{i}].source: {rule.source!r} (rule for {rule.targets}) is not a source; "
                    f"use one of: {known}, or add it under 'sources:'"
                )
        for name in self.kernels:
            if name not in self.sources:
                raise ValueError(f"kernels.{name}: {name!r} is not a source; use one of: {known}")
        return self

    def source_for(self, names: tuple[str, ...]) -> tuple[str | None, int | None]:
        """The source of the first rule with a target matching any of ``names``,
        and that rule's index; ``(default, None)`` when no rule matches."""
        for i, rule in enumerate(self.rules):
            if any(target_matches(t, n) for t in rule.targets for n in names):
                return rule.source, i
        return self.default, None

    def only(self, source: str) -> Recipe:
        """The whole model from one source, same base and dtype: the pure
        baseline that plan, eval and bench compare a recipe against."""
        return self.model_copy(update={"default": source, "rules": []})

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written into a composed ``config.json``."""
        return self.model_dump(mode="json")


def target_matches(target: str, name: str) -> bool:
    """Whether one rule target matches one layer or member name."""
    if target.startswith("re:"):
        return _regex(target[3:]).fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, target)


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def recipe_from_dict(data: Any, origin: str | Path | None = None) -> Recipe:
    """Validate plain data as a recipe; relative source paths resolve against
    the directory of ``origin`` (the recipe file), else the working directory."""
    where = f"recipe {origin}" if origin else "recipe"
    if not isinstance(data, dict):
        raise MixedError(
            f"{where}: expected a mapping with keys sources, base, default, dtype, rules; "
            f"got {type(data).__name__}. See configs/ for examples."
        )
    data = dict(data)
    root = Path(origin).resolve().parent if origin else Path.cwd()
    if isinstance(data.get("sources"), dict):
        data["sources"] = {
            str(k): _resolve_source(where, str(k), v, root) if isinstance(v, str | Path) else v
            for k, v in data["sources"].items()
        }
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise MixedError(_explain(exc, where)) from None


def _resolve_source(where: str, name: str, value: str | Path, root: Path) -> str:
    """An absolute path for a source: relative paths resolve against the
    recipe's directory. Paths are data: no ``~``, variable or shell expansion."""
    text = str(value)
    if "\x00" in text or not text.strip():
        raise MixedError(f"{where}: sources.{name}: {text!r} is not a directory path; write the checkpoint directory")
    try:
        return str((root / text).resolve())
    except (OSError, RuntimeError, ValueError) as exc:
        raise MixedError(
            f"{where}: sources.{name}: cannot resolve {text!r} ({exc}); write the checkpoint directory"
        ) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise MixedError(f"recipe {path}: no such file; pass the path of a recipe YAML (see configs/)")
    try:
        # safe_load: plain data only; python/* and unknown tags raise ConstructorError, nothing is imported or run
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MixedError(f"recipe {path}: not UTF-8 text; a recipe is a YAML file (see configs/)") from None
    except RecursionError:
        raise MixedError(f"recipe {path}: nested too deeply to be a recipe; see configs/ for the shape") from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        tag = re.search(r"tag '([^']*)'", str(exc.problem))
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else str(exc.problem)
        raise MixedError(
            f"recipe {path}: YAML tag {shown!r}{at} is not allowed; a recipe is plain data (mappings, lists, "
            "strings) and nothing in it is constructed, imported or run. Remove the tag"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise MixedError(
            f"recipe {path}: YAML syntax error{at}: {problem}; fix the YAML (indentation, quotes, colons)"
        ) from None
    return recipe_from_dict(data, origin=path)


_NONEMPTY = {
    "sources": "at least one checkpoint as name: directory",
    "targets": "at least one layer name, glob or 're:<regex>'",
}
_ALLOWED = {
    (): sorted(Recipe.model_fields),
    ("rules",): sorted(Rule.model_fields),
    ("kernels",): sorted(SourceKernels.model_fields),
}


_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 160, 160
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 6


def _shown(value: Any) -> str:
    """A bounded repr of an offending value: a YAML alias bomb must not
    become a gigabyte error message."""
    return _REPR.repr(value)


def _explain(exc: ValidationError, where: str) -> str:
    """One message per problem, each naming the key, the value and the fix."""
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        key = _key(loc)
        value = err.get("input")
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = tuple(p for p in loc[:-1] if not isinstance(p, int))
            parent = parent[:1] if parent[:1] == ("kernels",) else parent  # kernels.<source>.<key>
            allowed = ", ".join(_ALLOWED.get(parent, []))
            lines.append(f"unknown key {key!r}; allowed keys here: {allowed}")
        elif kind == "missing":
            lines.append(f"missing key {key!r}; add it (see configs/ for an example)")
        elif kind == "literal_error" and loc[-1] == "dtype":
            lines.append(f"dtype: {_shown(value)} is not supported; use one of: {', '.join(DTYPES)}")
        elif kind == "too_short":
            what = _NONEMPTY.get(loc[-1], "at least one entry")
            lines.append(f"{key}: is empty; give {what}")
        elif kind == "list_type":
            lines.append(f"{key}: must be a YAML list such as [a, b] (got {_shown(value)})")
        elif kind == "dict_type":
            lines.append(f"{key}: must be a YAML mapping of name: value (got {_shown(value)})")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            prefix = f"{key}: " if key and not msg.startswith(key) else ""
            shown = "" if kind == "value_error" else f" (got {_shown(value)})"
            lines.append(f"{prefix}{msg}{shown}")
    return f"{where}: " + "; ".join(lines)


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
