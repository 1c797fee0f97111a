"""On-disk formats, one module each, registered in one place.

Adding a format is one module with a :class:`~vllm_mixed.formats.base.Format`
object and one ``register_format`` line below. Everything else asks this
registry: :func:`detect_format` for a checkpoint's ``quantization_config``,
:func:`get_format` for a format named in a plan or a composed config.
"""

from __future__ import annotations

from typing import Any

from vllm_mixed.errors import MixedError
from vllm_mixed.formats.awq import AWQ
from vllm_mixed.formats.base import Format, TensorSpec
from vllm_mixed.formats.ct_fp8 import CT_FP8, fp8_config
from vllm_mixed.formats.ct_w4a16 import CT_W4A16, w4a16_config
from vllm_mixed.formats.fp8_block import FP8_BLOCK
from vllm_mixed.formats.gptq_int4 import GPTQ_INT4
from vllm_mixed.formats.gptq_int8 import GPTQ_INT8
from vllm_mixed.formats.gptq_variants import act_order_tiny, channelwise_tiny
from vllm_mixed.formats.unquantized import UNQUANTIZED

__all__ = [
    "FORMATS", "FORMAT_NAMES", "TINY_FORMATS", "TINY_VARIANTS", "UNQUANTIZED", "Format", "TensorSpec", "detect_format",
    "get_format", "register_format",
]  # fmt: skip

FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format under its name (registering a name twice is a programming error)."""
    if not fmt.name or fmt.name in FORMATS:
        raise ValueError(f"format name {fmt.name!r} is empty or registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


register_format(UNQUANTIZED)
register_format(FP8_BLOCK)
register_format(GPTQ_INT4)
register_format(GPTQ_INT8)
register_format(AWQ)
register_format(CT_W4A16)
register_format(CT_FP8)

FORMAT_NAMES = tuple(FORMATS)
# what `make-tiny` writes by default, in this order
TINY_FORMATS: tuple[Format, ...] = (UNQUANTIZED, FP8_BLOCK, GPTQ_INT4)
# the other published configs of registered formats that `make-tiny --formats` writes, by directory name
TINY_VARIANTS: tuple[Format, ...] = (
    act_order_tiny(), channelwise_tiny(),
    CT_W4A16.with_tiny("ct-w4a16-asym-g64", w4a16_config(group_size=64, symmetric=False), "ctint4a"),
    CT_FP8.with_tiny("ct-fp8-tensor-static", fp8_config(weights="tensor", activations="static"), "ctfp8s"),
    CT_FP8.with_tiny("ct-fp8-block", fp8_config(weights="block"), "ctfp8b"),
)  # fmt: skip


def get_format(name: str) -> Format:
    """The registered format of this name; KeyError for anything else
    (names come from plans and composed configs, which are checked first)."""
    return FORMATS[name]


def detect_format(quant_config: dict[str, Any] | None, where: str) -> str:
    """The format name of a checkpoint from its ``quantization_config``: the
    first registered format that claims it, after its own validation."""
    if not quant_config:
        return UNQUANTIZED.name
    for fmt in FORMATS.values():
        if fmt.quantized and fmt.claims(quant_config):
            fmt.validate(quant_config, where)
            return fmt.name
    method = str(quant_config.get("quant_method", "")).lower()
    supported = ", ".join(f.description for f in FORMATS.values())
    raise MixedError(f"{where}: quantization_config.quant_method {method!r} is not supported; supported: {supported}")
