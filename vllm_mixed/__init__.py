"""vllm-mixed: one model composed layer by layer from several published
checkpoints, served on vLLM's own kernels.

Importing this package registers nothing and imports no vLLM; vLLM calls
:func:`register` through the ``vllm.general_plugins`` entry point in every
process it starts.
"""

from __future__ import annotations

__all__ = ["register", "__version__"]

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the ``mixed`` quantization config and load format with vLLM
    (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm_mixed.vllm_compat import request_cpu_amx
    from vllm_mixed.vllm_registration import register_with_vllm

    register_with_vllm()
    request_cpu_amx()
    _registered = True
