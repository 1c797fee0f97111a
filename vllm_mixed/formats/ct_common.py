"""What the two compressed-tensors source formats share: reading a
``quantization_config`` of ``quant_method: compressed-tensors`` (as
llm-compressor writes it and vLLM's ``CompressedTensorsConfig`` reads it).

The config is plain JSON; it is read here without importing
compressed-tensors (whose import pulls in transformers, seconds per
``plan``), with the defaults compressed-tensors' ``QuantizationArgs`` infers
(strategy from ``group_size``, ``symmetric`` true, ``dynamic`` false).
Matching follows vLLM's (``compressed_tensors/utils.py``:
``should_ignore_layer`` / ``find_matched_target``): a target or ignore entry
is a module name, ``re:`` + a regular expression tried with ``re.match``
(anchored at the start only: published configs end theirs with ``$``), or
the class name ``Linear`` (every linear of the checkpoint's model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from vllm_mixed.errors import MixedError

if TYPE_CHECKING:
    from vllm_mixed.models.base import Layer

__all__ = [
    "CT_METHOD", "CtArgs", "CtScheme", "ct_kind", "is_ct", "layer_converted", "matches", "scheme", "unsupported_reason",
]  # fmt: skip

CT_METHOD = "compressed-tensors"
PACK_QUANTIZED, FLOAT_QUANTIZED = "pack-quantized", "float-quantized"
W4A16, FP8 = "w4a16", "fp8"
SUPPORTED = (
    "pack-quantized W4A16 (int4 weights, group or channel strategy, symmetric or asymmetric, no activation "
    "quantization) and float-quantized FP8 (weights per channel, per tensor or in 2-D blocks; activations "
    "dynamic per token / per group, or static per tensor)"
)


@dataclass(frozen=True)
class CtArgs:
    """One ``QuantizationArgs`` (weights or input activations), normalised."""

    num_bits: int
    type: str  # int | float
    strategy: str  # tensor | channel | group | block | token | ...
    group_size: int | None
    block: tuple[int, int] | None
    symmetric: bool
    dynamic: bool
    actorder: str | None

    def label(self) -> str:
        extra = f" {self.group_size}" if self.strategy == "group" else ""
        extra += f" block {list(self.block)}" if self.block else ""
        sym = "" if self.symmetric else " asymmetric"
        return f"{self.type}{self.num_bits} {self.strategy}{extra}{sym}{' dynamic' if self.dynamic else ''}"


@dataclass(frozen=True)
class CtScheme:
    """The one quantization scheme of a checkpoint (every config group's)."""

    format: str
    weights: CtArgs
    inputs: CtArgs | None
    targets: tuple[str, ...]
    ignore: tuple[str, ...]

    @property
    def group(self) -> int:
        """Group size as vLLM counts it: -1 for the channel strategy."""
        return self.weights.group_size if self.weights.strategy == "group" and self.weights.group_size else -1


def is_ct(quant_config: dict[str, Any] | None) -> bool:
    return str((quant_config or {}).get("quant_method", "")).lower() == CT_METHOD


def _args(raw: Any, what: str) -> CtArgs | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} is {raw!r}, not an object")
    group = raw.get("group_size")
    strategy = raw.get("strategy")
    if strategy is None:  # QuantizationArgs.validate_model_after
        strategy = "tensor" if group is None else "group" if group > 0 else "channel"
    block = raw.get("block_structure")
    return CtArgs(
        num_bits=int(raw.get("num_bits", 8)),
        type=str(raw.get("type", "int")).lower(),
        strategy=str(strategy).lower(),
        group_size=int(group) if group is not None else None,
        block=(int(block[0]), int(block[1])) if block else None,
        symmetric=bool(raw.get("symmetric", True)),
        dynamic=bool(raw.get("dynamic", False)),
        actorder=None if raw.get("actorder") in (None, False) else str(raw["actorder"]).lower(),
    )


@cache
def _parse(text: str) -> tuple[list[tuple[str, CtScheme]], str | None]:
    """(config group name, scheme) for every weight group, or why the config cannot be read."""
    qc = json.loads(text)
    try:
        return _read(qc)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        return [], f"it is malformed ({exc})"


def _read(qc: dict[str, Any]) -> tuple[list[tuple[str, CtScheme]], str | None]:
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("targets") or str(qc.get("format", "")).startswith(("sparse", "marlin-24")):
        what = sparsity.get("format") or qc.get("format")
        return [], f"it is sparse ({what}; vLLM removed compressed-tensors sparsity support)"
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return [], "it has no config_groups"
    out = []
    ignore = tuple(str(t) for t in qc.get("ignore") or ())
    for name, group in groups.items():
        targets = tuple(str(t) for t in group.get("targets") or ())
        if len(targets) == 1 and targets[0].endswith("Attention"):
            continue  # attention (kv-cache) quantization: vLLM's from_config drops these groups too
        weights = _args(group.get("weights"), f"config_groups.{name}.weights")
        if weights is None:
            return [], f"config_groups.{name} quantizes no weights"
        inputs = _args(group.get("input_activations"), f"config_groups.{name}.input_activations")
        fmt = str(group.get("format") or qc.get("format") or "")
        out.append((str(name), CtScheme(fmt, weights, inputs, targets, ignore)))
    if not out:
        return [], "it quantizes no linear weights (only attention / kv-cache groups)"
    return out, None


def _groups(quant_config: dict[str, Any]) -> tuple[list[tuple[str, CtScheme]], str | None]:
    return _parse(json.dumps(quant_config, sort_keys=True, default=str))


def _kind_of(s: CtScheme) -> str | None:
    w, a = s.weights, s.inputs
    if s.format == PACK_QUANTIZED and w.type == "int" and w.num_bits == 4 and a is None:
        return W4A16
    if s.format == FLOAT_QUANTIZED and w.type == "float" and w.num_bits == 8:
        return FP8
    return None


def ct_kind(quant_config: dict[str, Any]) -> str | None:
    """``w4a16`` or ``fp8`` when every config group is that kind of scheme;
    ``None`` for anything else (another scheme, mixed groups, malformed)."""
    groups, problem = _groups(quant_config)
    kinds = {_kind_of(s) for _, s in groups}
    return kinds.pop() if problem is None and len(kinds) == 1 else None


def unsupported_reason(quant_config: dict[str, Any]) -> str | None:
    """Why a compressed-tensors config is neither supported kind, or ``None``."""
    groups, problem = _groups(quant_config)
    if problem:
        return problem
    if len({(s.format, s.weights, s.inputs) for _, s in groups}) > 1:
        shown = "; ".join(
            f"{n} ({s.format}: weights {s.weights.label()}, targets {list(s.targets)})" for n, s in groups
        )
        return (
            f"its config_groups use different schemes ({shown}); vllm-mixed reads one scheme per source: route "
            "the layers of each scheme from a checkpoint that holds only that scheme"
        )
    _, s = groups[0]
    if _kind_of(s) is None:
        inputs = s.inputs.label() if s.inputs else "none"
        return (
            f"its scheme is {s.format or 'without a format'}: weights {s.weights.label()}, input activations {inputs}"
        )
    return None


def scheme(quant_config: dict[str, Any] | None, where: str = "compressed-tensors source") -> CtScheme:
    """The checkpoint's one scheme (detection has checked there is one)."""
    groups, problem = _groups(quant_config or {})
    if problem or not groups:
        raise MixedError(f"{where}: quantization_config cannot be read: {problem or 'no weight groups'}")
    return groups[0][1]


def matches(name: str, pattern: str) -> bool:
    """vLLM's ``is_equal_or_regex_match`` for a checkpoint module name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def _targeted(name: str, targets: tuple[str, ...]) -> bool:
    # every quantizable member is a torch Linear in the checkpoint's model
    return any(t == "Linear" or matches(name, t) for t in targets)


def layer_converted(quant_config: dict[str, Any] | None, layer: Layer, where: str) -> bool:
    """Whether a quantizable layer is quantized in this checkpoint: its
    members targeted by the config groups and not ignored, all alike (vLLM
    runs a fused layer as one GEMM: its own check raises on a split; the
    error starts with ``where``)."""
    groups, problem = _groups(quant_config or {})
    if problem or not groups:
        return False
    ignore = groups[0][1].ignore
    targets = tuple(t for _, s in groups for t in s.targets)
    names = [m.name for m in layer.members]
    quantized = [(_targeted(n, targets) and not any(matches(n, i) for i in ignore)) for n in names]
    if all(quantized):
        return True
    if not any(quantized):
        return False
    yes = [n for n, q in zip(names, quantized, strict=True) if q][:3]
    no = [n for n, q in zip(names, quantized, strict=True) if not q][:3]
    raise MixedError(
        f"{where}: compressed-tensors source: fused layer {layer.name!r} is partly quantized (quantized: {', '.join(yes)}; "
        f"ignored or untargeted: {', '.join(no)}); vLLM runs it as one GEMM with one scheme. Fix the checkpoint's "
        "ignore/targets, or route the layer to another source"
    )
