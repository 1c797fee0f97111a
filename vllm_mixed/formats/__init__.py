"""On-disk formats, one module each, chosen from one table.

Adding a format is one module implementing :class:`~vllm_mixed.formats.base.Format`
and one row in :data:`FORMATS`.
"""

from __future__ import annotations

from vllm_mixed.formats.base import Format, TensorSpec
from vllm_mixed.formats.fp8_block import FP8_BLOCK
from vllm_mixed.formats.gptq_int4 import GPTQ_INT4
from vllm_mixed.formats.unquantized import UNQUANTIZED

__all__ = ["FORMATS", "Format", "TensorSpec"]

FORMATS: dict[str, Format] = {
    "unquantized": UNQUANTIZED,
    "fp8_block": FP8_BLOCK,
    "gptq_int4": GPTQ_INT4,
}
