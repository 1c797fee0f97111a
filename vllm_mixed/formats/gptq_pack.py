"""Integer packing shared by the GPTQ formats (4 and 8 bits) and AWQ: values
of ``bits`` bits packed ``32 // bits`` to an int32 word, value j of a word in
bits ``bits*j .. bits*j + bits - 1`` (lowest first), plus the fp16 scale
rounding and the act-order group index the writers use. Pure torch."""

from __future__ import annotations

import torch

_WORDS = {4: "four", 8: "eight"}

__all__ = ["act_order_g_idx", "dequantize_stacked", "fp16_scale", "pack_bits", "unpack_bits"]


def pack_bits(values: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Pack values 0 .. 2**bits - 1 ``32 // bits`` to an int32 word along ``dim``."""
    per_word, maxq = 32 // bits, 2**bits - 1
    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % per_word:
        raise ValueError(f"cannot pack {v.shape[-1]} values {_WORDS.get(per_word, per_word)} to a word")
    if v.numel() and (v.min() < 0 or v.max() > maxq):
        raise ValueError(f"int{bits} values must lie in 0..{maxq}")
    v = v.reshape(*v.shape[:-1], -1, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=v.device)
    words = (v << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_bits(words: torch.Tensor, dim: int, bits: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words -> values in ``dtype``
    (unpacked in int32: the arithmetic shift's sign bits are masked off)."""
    d = dim % words.dim()
    shape = [1] * (words.dim() + 1)
    shape[d + 1] = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(shape)
    v = ((words.to(torch.int32).unsqueeze(d + 1) >> shifts) & (2**bits - 1)).flatten(d, d + 1)
    return v.to(dtype)


def fp16_scale(need: torch.Tensor) -> torch.Tensor:
    """``need`` (float64) as an fp16 scale that is never smaller: rounding it
    down would push a group's extremes past the last step (error > scale/2).
    Never zero, so all-zero groups quantize to exact zeros."""
    scale = need.clamp(min=2**-24).to(torch.float16)
    up = torch.nextafter(scale, torch.tensor(torch.inf, dtype=torch.float16, device=scale.device))
    return torch.where(scale.to(torch.float64) < need, up, scale)


def act_order_g_idx(k: int, group: int, seed: int | None = None) -> torch.Tensor:
    """The ``g_idx`` GPTQ writes with ``desc_act: true``: the columns are
    quantized in a permuted order (by the input Hessian's diagonal, which the
    members of one fused layer share) and group j holds the columns at
    permuted positions j*g .. j*g+g-1, so ``g_idx[k] = position(k) // g``.
    The tiny writer's order is a permutation seeded by ``k`` (or ``seed``):
    every member with the same input gets the same one, as in GPTQ."""
    gen = torch.Generator().manual_seed(k if seed is None else seed)
    perm = torch.randperm(k, generator=gen)
    position = torch.empty(k, dtype=torch.int64)
    position[perm] = torch.arange(k)
    return (position // group).to(torch.int32)


def dequantize_stacked(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype,
    out_dtype: torch.dtype, chunk: int = 16, bits: int = 4,
) -> torch.Tensor:  # fmt: skip
    """GPTQ v1 experts stacked as vLLM's MoE registers them (``qweight``
    [E, K/p, N], ``qzeros`` [E, K/g, N/p], ``scales`` [E, K/g, N], p = 32 //
    bits, sequential groups) to [E, N, K] in ``out_dtype``, ``chunk`` experts
    at a time; equal per expert to the format's ``dequantize`` in ``dtype``."""
    e, kp, n = qweight.shape
    k = kp * (32 // bits)
    g = k if group == -1 else group
    out = torch.empty(e, n, k, dtype=out_dtype)
    for lo in range(0, e, chunk):
        hi = min(lo + chunk, e)
        # transpose the packed words so every later step writes [N, K] contiguously
        q = unpack_bits(qweight[lo:hi].transpose(1, 2), 2, bits, torch.int32).view(hi - lo, n, k // g, g)
        zeros = (unpack_bits(qzeros[lo:hi], 2, bits, torch.int32) + 1).transpose(1, 2).unsqueeze(3)
        w = (q - zeros).to(dtype) * scales[lo:hi].transpose(1, 2).to(dtype).unsqueeze(3)
        out[lo:hi] = w.view(hi - lo, n, k)
    return out
