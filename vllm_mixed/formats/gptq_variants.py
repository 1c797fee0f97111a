"""The published GPTQ 4-bit variants beside the default (GPTQModel's
``desc_act: false``, group 128): act-order with groups, and channelwise
(``group_size: -1``), as configs and as tiny layouts of the same registered
format (``make-tiny --formats``, tests and the GPU oracle)."""

from __future__ import annotations

from typing import Any

from vllm_mixed.formats.gptq_int4 import GPTQ_INT4, GPTQ_QUANT_CONFIG, GptqInt4

__all__ = ["GPTQ_ACT_ORDER_QUANT_CONFIG", "GPTQ_CHANNELWISE_QUANT_CONFIG", "act_order_tiny", "channelwise_tiny"]

# desc_act: true (act-order) as GPTQModel writes it with static_groups: false
GPTQ_ACT_ORDER_QUANT_CONFIG: dict[str, Any] = {**GPTQ_QUANT_CONFIG, "desc_act": True}


def act_order_tiny() -> GptqInt4:
    """The 4-bit format with a tiny layout of an act-order checkpoint
    (``DIR/gptq-int4-actorder``, source ``int4a``): the same registered
    format, another published config (for tests and the GPU oracle)."""
    return GPTQ_INT4.with_tiny("gptq-int4-actorder", GPTQ_ACT_ORDER_QUANT_CONFIG, "int4a")


# channelwise act-order, as TheBloke's main-branch GPTQ checkpoints declare it (Mixtral-8x7B-Instruct:
# group_size -1, desc_act true); with one group per output channel the column order changes nothing,
# and vLLM reads it as desc_act false (AutoGPTQConfig / gptq_utils)
GPTQ_CHANNELWISE_QUANT_CONFIG: dict[str, Any] = {**GPTQ_QUANT_CONFIG, "group_size": -1, "desc_act": True}


def channelwise_tiny() -> GptqInt4:
    """The 4-bit format with a tiny layout of a channelwise act-order
    checkpoint (``DIR/gptq-int4-channel``, source ``int4c``)."""
    return GPTQ_INT4.with_tiny("gptq-int4-channel", GPTQ_CHANNELWISE_QUANT_CONFIG, "int4c")
