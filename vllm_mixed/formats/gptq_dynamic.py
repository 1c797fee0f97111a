"""GPTQModel's per-module ``dynamic`` rules in a GPTQ ``quantization_config``,
read as vLLM reads them (``gptq_utils.get_dynamic_override``): a key
``"-:REGEX"`` leaves every module whose vLLM name ``re.match``-es REGEX
unquantized (GPTQModel writes those tensors in float); a key ``"+:REGEX"``
or a bare ``REGEX`` overrides ``bits`` / ``group_size`` / ``desc_act`` /
``sym`` for the modules it matches. Rules are tried in order and the first
that matches wins, as in vLLM.

A source here has one precision, so negative rules are read (those layers
come from the source in float) and a positive rule that changes the
precision is refused with the rule named."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from vllm_mixed.errors import MixedError

if TYPE_CHECKING:
    from vllm_mixed.models.base import Layer

__all__ = ["dynamic_problems", "skipped_by_dynamic"]

PRECISION_KEYS = ("bits", "group_size", "desc_act", "sym")


def _rules(quant_config: dict[str, Any] | None) -> list[tuple[bool, str, dict]]:
    """(negative, regex, overrides) per rule, in the config's order."""
    dynamic = (quant_config or {}).get("dynamic") or {}
    out = []
    for key, overrides in dynamic.items():
        negative = key.startswith("-:")
        out.append((negative, key[2:] if key[:2] in ("-:", "+:") else key, overrides or {}))
    return out


def dynamic_problems(quant_config: dict[str, Any]) -> list[str]:
    """What in ``dynamic`` this reader cannot honour (for ``validate``)."""
    dynamic = quant_config.get("dynamic")
    if dynamic is None:
        return []
    if not isinstance(dynamic, dict):
        return [f"dynamic={dynamic!r} (GPTQModel writes a mapping of module regexes to overrides)"]
    problems = []
    for negative, regex, overrides in _rules(quant_config):
        try:
            re.compile(regex)
        except re.error as exc:
            problems.append(f"dynamic rule {regex!r} is not a regular expression ({exc})")
            continue
        changed = {k: v for k, v in overrides.items() if k in PRECISION_KEYS and v != quant_config.get(k)}
        if not negative and changed:
            problems.append(
                f"dynamic rule {regex!r} gives the modules it matches another precision ({changed}); a source has one "
                "precision here: use a checkpoint quantized without per-module overrides for those layers"
            )
    return problems


def skipped_by_dynamic(quant_config: dict[str, Any] | None, layer: Layer, where: str) -> bool:
    """Whether the first ``dynamic`` rule matching ``layer``'s vLLM name is a
    negative one (vLLM then builds the layer unquantized). A negative rule
    that matches only some of a fused layer's checkpoint members cannot be
    served (vLLM matches its fused name and would quantize the layer), so it
    is an error naming both."""
    for negative, regex, _ in _rules(quant_config):
        if re.match(regex, layer.name):
            return negative
        hit = next((m.name for m in layer.members if re.match(regex, m.name)), None) if negative else None
        if hit is not None:
            raise MixedError(
                f"{where}: dynamic rule '-:{regex}' leaves {hit!r} unquantized but not the fused layer "
                f"{layer.name!r} it belongs to; vLLM matches rules against the fused name and would read it "
                "quantized: this checkpoint cannot be served as published"
            )
    return False
