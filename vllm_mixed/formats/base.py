"""The interface every on-disk format implements, and the tensor spec type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["Format", "TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor of a linear must be: allowed safetensors
    dtypes (the first is what the writer uses) and its exact shape."""

    dtypes: tuple[str, ...]
    shape: tuple[int, ...]


class Format(Protocol):
    """One published on-disk format of a linear layer's weight."""

    name: str

    def precision(self, quant_config: dict[str, Any] | None) -> str:
        """Short label for tables, e.g. ``int4-g128``."""

    def specs(self, out_features: int, in_features: int, quant_config: dict[str, Any] | None) -> dict[str, TensorSpec]:
        """Checkpoint tensor suffix -> spec, for a ``[out, in]`` linear."""

    def quantize(self, weight: torch.Tensor, quant_config: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        """Writer side: the checkpoint tensors that encode ``weight``."""

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Reference decoder: the ``[out, in]`` weight the tensors encode."""
