"""The CUDA kernel rules of GPTQ shards (4 and 8 bits, with and without
act-order), restated from vLLM 0.26's own checks; the GPTQ formats' rule
methods call these. Pure: no vLLM import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_mixed.parallel import FAILS, FALLBACK, HOPPER, OK

if TYPE_CHECKING:
    from vllm_mixed.parallel import LinearShard

__all__ = ["gptq_linear_rule", "gptq_moe_rule"]

MARLIN_GROUPS = (-1, 32, 64, 128)  # marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES


def gptq_linear_rule(
    bits: int, shard: LinearShard, g: int, act_order: bool, dtype: str, capability: int
) -> tuple[str, str, str]:
    """kernels/linear/__init__.py:choose_mp_linear_kernel takes the first of
    its CUDA list whose can_implement accepts the shard (AllSpark: Ampere and
    channelwise only; Conch: optional package, absent from the CUDA wheel):
    MacheteLinearKernel (sm90 only; uint4b8/uint8b128, group -1/64/128, K % 64,
    N % 128; act-order only unsplit), MarlinLinearKernel (uint4b8/uint8b128;
    without act-order only a quant group straddling ranks is refused, tile
    misalignment is padded; with it marlin_utils.check_marlin_supports_shape:
    N % 64, K % 128, whole groups per rank), ExllamaLinearKernel (fp16 only,
    act-order only unsplit), TritonW4A16LinearKernel (4-bit only, no
    act-order). Without act-order a quant group straddling ranks is refused
    even where Machete would take it: auto_gptq.py:AutoGPTQLinearMethod.
    create_weights then allocates K // group scale rows per rank, and the
    scales load silently wrong (with act-order every rank holds all groups,
    marlin_repeat_scales_on_all_ranks, but Marlin still wants whole groups)."""
    k, n, split_k = shard.k, shard.n, shard.k != shard.k_full
    whole_groups = g == -1 or g >= shard.k_full or k % g == 0
    if not whole_groups:
        why = (
            f"input_size_per_partition {k} is not a whole number of quant groups of {g}: Marlin and Triton refuse "
            "it (can_implement), and AutoGPTQLinearMethod.create_weights would load its scales wrong"
        )
        return "AutoGPTQLinearMethod", FAILS, why
    candidates = [  # in choose_mp_linear_kernel's order, with whole groups per rank
        ("Machete", capability == HOPPER and not (act_order and split_k) and g in (-1, 64, 128)
         and k % 64 == 0 and n % 128 == 0),
        ("Marlin", g in MARLIN_GROUPS and (not act_order or (n % 64 == 0 and k % 128 == 0))),
        ("Exllama", dtype == "float16" and not (act_order and split_k) and n % (32 // bits) == 0 and g > 0),
        ("TritonW4A16", bits == 4 and n % 8 == 0 and not act_order
         and (g in (-1, 32, 64, 128, 256) or g == shard.k_full)),
    ]  # fmt: skip
    preferred = candidates[0][0] if capability == HOPPER else candidates[1][0]
    for name, accepts in candidates:
        if accepts:
            status = OK if name == preferred else FALLBACK
            why = "" if status == OK else f"{preferred} does not accept [{k} -> {n}] with group {g}"
            return f"AutoGPTQLinearMethod: {name}", status, why
    return "AutoGPTQLinearMethod", FAILS, f"no int{bits} kernel accepts [{k} -> {n}] (choose_mp_linear_kernel raises)"


def gptq_moe_rule(inter: int, hidden: int, g: int, act_order: bool) -> tuple[str, str, str]:
    """quantization/auto_gptq.py:AutoGPTQConfig.get_quant_method runs Marlin
    MoE (uint4b8 and uint8b128) when marlin_utils.check_moe_marlin_supports_layer
    accepts the layer (hidden % 128, group in -1/32/64/128, and with
    allow_tile_padding=not desc_act: intermediate per rank % group; with
    act-order % max(64, group)), else MoeWNA16Config(full_config).
    get_quant_method: moe_wna16.py:MoeWNA16Method.create_weights halves the
    group size until it divides both sizes and asserts it stays >= 32. It
    registers no g_idx, so act-order experts there would decode wrongly."""
    tile = max(64, g) if act_order else g
    if g in MARLIN_GROUPS and hidden % 128 == 0 and (g <= 0 or inter % tile == 0):
        pad = "" if act_order or inter % 64 == 0 else " (intermediate tile-padded, marlin_moe_padded_intermediate)"
        return f"AutoGPTQMoEMethod: Marlin MoE{pad}", OK, ""
    why = f"Marlin MoE needs intermediate_size_per_partition {inter} % {tile} == 0 (check_moe_marlin_supports_layer)"
    if act_order:
        why += "; its fallback MoeWNA16Method has no act-order (g_idx): route the experts to a desc_act: false source"
        return "MoeWNA16Method", FAILS, why
    wg = g
    while wg > 0 and (inter % wg or hidden % wg):
        wg //= 2
        if wg < 32:
            why += f", and MoeWNA16Method.create_weights asserts a regrouped group size >= 32 ({wg} here)"
            return "MoeWNA16Method", FAILS, why
    why += (
        "; measured on an H100 with vLLM 0.26, the MoE-WNA16 Triton kernel gave 44 % less output throughput than "
        "Marlin at 256 sequences and took 29 % longer per token at batch 1 (benchmarks/RESULTS.md)"
    )
    return f"MoeWNA16Method (Triton, group {wg})", FALLBACK, why
