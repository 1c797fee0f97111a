"""Benchmark-only vLLM plugin, inert unless its environment variables are set.
``benchmarks/device_setup.sh`` registers it as a general plugin, so it runs in
every vLLM process, stock rows and plugin rows alike.

``VLLM_MIXED_BENCH_INT_FILL=1``: deterministic integer weights under
``--load-format dummy``. vLLM 0.26's dummy loader
(``weight_utils.initialize_single_dummy_weight``) fills floating-point
parameters with seeded uniform values but returns early for integer ones on
CUDA, leaving GPTQ ``qweight``/``qzeros``/``g_idx`` as ``torch.empty``: int4
experts then compute on whatever the caching allocator hands out, which
differs between processes and between a stock and a plugin engine, and so does
the expert routing that follows. This fills integer parameters with random
bits from a generator seeded like vLLM's float fill (values depend only on
shape and dtype), so every row gets the same well-spread int4 codes. ``g_idx``
content is irrelevant with ``desc_act: false`` (Marlin replaces it).

``VLLM_MIXED_BENCH_LOAD_PROBE=1``: logs the peak and the resident GPU memory
of ``BaseModelLoader.load_model`` (allocation, weight loading and
``process_weights_after_loading``), for any loader.
"""

from __future__ import annotations

import os
import re

_PROBE = re.compile(
    r"BENCH_LOAD_PROBE loader=(\w+) seconds=([\d.]+) before_gib=([\d.]+) peak_gib=([\d.]+) resident_gib=([\d.]+)"
)


def parse_load_probe(log: str) -> dict | None:
    """The probe's line in a row's log: loader class, seconds, and GPU GiB
    before, at peak and resident after ``load_model``; None if absent."""
    m = _PROBE.search(log)
    if m is None:
        return None
    numbers = dict(zip(("seconds", "before_gib", "peak_gib", "resident_gib"), map(float, m.groups()[1:]), strict=True))
    return {"loader": m.group(1), **numbers}


def register() -> None:
    if os.environ.get("VLLM_MIXED_BENCH_INT_FILL") == "1":
        _int_fill()
    if os.environ.get("VLLM_MIXED_BENCH_LOAD_PROBE") == "1":
        _load_probe()


def _int_fill() -> None:
    import torch
    from vllm.model_executor.model_loader import dummy_loader, weight_utils

    original = weight_utils.initialize_single_dummy_weight
    if getattr(original, "_bench_hook", False):
        return

    @torch.no_grad()
    def fill(param: torch.Tensor, low: float = -1e-3, high: float = 1e-3, seed: int = 1234) -> None:
        if param.device.type == "meta" or torch.is_floating_point(param) or param.dtype == torch.bool:
            return original(param, low, high, seed)
        if param.numel() == 0:
            return None
        gen = torch.Generator(device=param.device)
        gen.manual_seed(seed)
        info = torch.iinfo(param.dtype)
        param.copy_(
            torch.randint(info.min, info.max, param.shape, generator=gen, device=param.device, dtype=param.dtype)
        )
        return None

    fill._bench_hook = True  # type: ignore[attr-defined]
    weight_utils.initialize_single_dummy_weight = fill
    dummy_loader.initialize_single_dummy_weight = fill


def _load_probe() -> None:
    import time

    import torch
    from vllm.logger import init_logger
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model
    if getattr(original, "_bench_hook", False):
        return
    logger = init_logger("vllm.bench_hooks")

    def load_model(self, vllm_config, model_config, prefix: str = ""):
        if not torch.cuda.is_available():
            return original(self, vllm_config, model_config, prefix)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        model = original(self, vllm_config, model_config, prefix)
        torch.cuda.synchronize()
        logger.info(
            "BENCH_LOAD_PROBE loader=%s seconds=%.3f before_gib=%.4f peak_gib=%.4f resident_gib=%.4f",
            type(self).__name__, time.perf_counter() - t0, before / 2**30,
            torch.cuda.max_memory_allocated() / 2**30, torch.cuda.memory_allocated() / 2**30,
        )  # fmt: skip
        return model

    load_model._bench_hook = True  # type: ignore[attr-defined]
    BaseModelLoader.load_model = load_model
