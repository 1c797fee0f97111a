"""Every difference between the supported vLLM releases (0.26 on CUDA through
0.32 on CPU) that the plugin sees, checked by feature in this one place.

Imports vLLM: only the adapter modules (config, methods, loader) use it.
"""

from __future__ import annotations

from functools import cache

__all__ = [
    "OPTIONAL_UNLOADED_PARAMS",
    "normalize_param_name",
    "is_cpu",
    "routed_experts_cls",
]

# Parameters a vLLM method may register that a checkpoint need not provide:
# GPTQ-MoE's zero-initialised biases (>= 0.27) and the act-order index buffers
# that 0.26 fills itself when desc_act is false.
OPTIONAL_UNLOADED_PARAMS = (
    "w13_bias", "w2_bias", "g_idx", "g_idx_sort_indices", "w13_g_idx", "w2_g_idx",
    "w13_g_idx_sort_indices", "w2_g_idx_sort_indices",
)  # fmt: skip


@cache
def is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def request_cpu_amx() -> None:
    """vLLM's CPU attention (``cpu_attn``) picks its AMX kernel whenever the
    CPU has AMX tiles but never asks Linux for them (``arch_prctl``
    ``ARCH_REQ_XCOMP_PERM``); oneDNN asks only when its own bf16 GEMMs use
    AMX. A first request short enough to reach attention before such a GEMM
    then kills the worker with SIGILL. Asking once per process, as torch's
    ``_init_amx`` does, is harmless elsewhere and a no-op without AMX."""
    import torch

    if is_cpu() and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        init = getattr(torch.cpu, "_init_amx", None)
        if init is not None:
            init()


@cache
def routed_experts_cls() -> type:
    """The layer class ``get_quant_method`` sees for MoE experts
    (``FusedMoE`` is a factory function in 0.26 and renamed afterwards)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    return RoutedExperts


def normalize_param_name(name: str) -> str:
    """Expert parameters live on ``mlp.experts.routed_experts``; 0.32 reports
    them loaded under that name, 0.26 without the ``routed_experts`` part."""
    return name.replace(".routed_experts.", ".")
