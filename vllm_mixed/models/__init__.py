"""Supported architectures, one module each, registered in one place.

Adding an architecture is one module implementing
:class:`~vllm_mixed.models.base.ModelSpec` and one line in :data:`MODELS`.
"""

from __future__ import annotations

from typing import Any

from vllm_mixed.errors import MixedError
from vllm_mixed.models.base import Geometry, Layer, Member, ModelSpec
from vllm_mixed.models.llama import LLAMA
from vllm_mixed.models.mixtral import MIXTRAL
from vllm_mixed.models.qwen2 import QWEN2
from vllm_mixed.models.qwen2_moe import QWEN2_MOE
from vllm_mixed.models.qwen3 import QWEN3
from vllm_mixed.models.qwen3_moe import QWEN3_MOE

__all__ = [
    "MODELS",
    "Geometry",
    "Layer",
    "Member",
    "ModelSpec",
    "geometry_for",
    "layers_for",
    "model_for",
    "register_model",
]

MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add an architecture under each of its ``architectures`` names (a
    name registered twice is a programming error)."""
    for arch in spec.architectures:
        if arch in MODELS:
            raise ValueError(f"architecture {arch!r} is registered twice")
        MODELS[arch] = spec
    return spec


register_model(QWEN3_MOE)
register_model(LLAMA)
register_model(QWEN3)
register_model(QWEN2)
register_model(MIXTRAL)
register_model(QWEN2_MOE)


def model_named(name: str) -> ModelSpec:
    """The architecture ``make-tiny --arch`` calls ``name`` (e.g. ``llama``)."""
    names = {spec.name: spec for spec in MODELS.values()}
    if name not in names:
        raise MixedError(f"--arch {name!r} is not a supported architecture; supported: {', '.join(sorted(names))}")
    return names[name]


def model_for(cfg: dict[str, Any], where: str) -> ModelSpec:
    """The architecture of a config.json, or a clear error naming the supported ones."""
    archs = cfg.get("architectures") or []
    for arch in archs if isinstance(archs, list) else []:
        if arch in MODELS:
            return MODELS[arch]
    raise MixedError(f"{where}: architectures {archs} are not supported; supported: {', '.join(sorted(MODELS))}")


def layers_for(cfg: dict[str, Any], where: str) -> list[Layer]:
    """The layer table for a config.json; errors name ``where``."""
    try:
        return model_for(cfg, where).layers(cfg)
    except MixedError as exc:
        msg = str(exc)
        raise MixedError(msg if msg.startswith(f"{where}: ") else f"{where}: {msg}") from None


def geometry_for(cfg: dict[str, Any], where: str) -> Geometry:
    try:
        return model_for(cfg, where).geometry(cfg)
    except MixedError as exc:
        msg = str(exc)
        raise MixedError(msg if msg.startswith(f"{where}: ") else f"{where}: {msg}") from None
