"""GPTQ int4 in the v1 checkpoint layout (AutoGPTQ / GPTQModel, read by
vLLM's gptq_marlin path).

Per quantized linear with K inputs, N outputs and group size g:
``qweight`` int32 [K/8, N] (eight 4-bit values along K, lowest nibble first),
``qzeros`` int32 [K/g, N/8] (packed along N), ``scales`` fp16 [K/g, N],
``g_idx`` int32 [K]. The v1 layout stores the zero point minus one, so a
symmetric checkpoint's qzeros words are all 0x77777777 (zero point 8).
real weight[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_mixed.formats.base import TensorSpec

__all__ = ["GPTQ_INT4", "dequantize_stacked", "pack_int4", "unpack_int4"]

BITS = 4
PER_WORD = 32 // BITS  # 8
MAXQ = 2**BITS - 1  # 15


def pack_int4(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack 4-bit values (0..15) eight to an int32 word along ``dim``
    (value j of a word in bits 4j..4j+3)."""
    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % PER_WORD:
        raise ValueError(f"cannot pack {v.shape[-1]} values eight to a word")
    if v.numel() and (v.min() < 0 or v.max() > MAXQ):
        raise ValueError("int4 values must lie in 0..15")
    v = v.reshape(*v.shape[:-1], -1, PER_WORD)
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    words = (v << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int4(words: torch.Tensor, dim: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 words -> values 0..15 in ``dtype``.
    Unpacked in int32 (the arithmetic shift's sign bits are masked off), a
    quarter of the traffic of int64; ``dtype=torch.int32`` skips the cast."""
    d = dim % words.dim()
    shape = [1] * (words.dim() + 1)
    shape[d + 1] = PER_WORD
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32).view(shape)
    v = ((words.to(torch.int32).unsqueeze(d + 1) >> shifts) & MAXQ).flatten(d, d + 1)
    return v.to(dtype)


def dequantize_stacked(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype,
    out_dtype: torch.dtype, chunk: int = 16,
) -> torch.Tensor:  # fmt: skip
    """Experts stacked as vLLM's MoE registers them (``qweight`` [E, K/8, N],
    ``qzeros`` [E, K/g, N/8], ``scales`` [E, K/g, N], sequential groups) to
    [E, N, K] in ``out_dtype``, ``chunk`` experts at a time; equal to
    :meth:`GptqInt4.dequantize` per expert computed in ``dtype``."""
    e, k8, n = qweight.shape
    k = k8 * PER_WORD
    g = k if group == -1 else group
    out = torch.empty(e, n, k, dtype=out_dtype)
    for lo in range(0, e, chunk):
        hi = min(lo + chunk, e)
        # transpose the packed words (1/8 of the values) so every later step writes [N, K] contiguously
        q = unpack_int4(qweight[lo:hi].transpose(1, 2), 2, torch.int32).view(hi - lo, n, k // g, g)
        zeros = (unpack_int4(qzeros[lo:hi], 2, torch.int32) + 1).transpose(1, 2).unsqueeze(3)
        w = (q - zeros).to(dtype) * scales[lo:hi].transpose(1, 2).to(dtype).unsqueeze(3)
        out[lo:hi] = w.view(hi - lo, n, k)
    return out


def _fp16_scale(need: torch.Tensor) -> torch.Tensor:
    """``need`` (float64) as an fp16 scale that is never smaller: rounding it
    down would push a group's extremes past the last step (error > scale/2).
    Never zero, so all-zero groups quantize to exact zeros."""
    scale = need.clamp(min=2**-24).to(torch.float16)
    up = torch.nextafter(scale, torch.tensor(torch.inf, dtype=torch.float16))
    return torch.where(scale.to(torch.float64) < need, up, scale)


def _group(quant_config: dict[str, Any] | None) -> int:
    return int((quant_config or {}).get("group_size", 128))


class GptqInt4:
    name = "gptq_int4"

    def precision(self, quant_config: dict[str, Any] | None) -> str:
        return f"int4-g{_group(quant_config)}"

    def specs(self, out_features: int, in_features: int, quant_config: dict[str, Any] | None) -> dict[str, TensorSpec]:
        g = _group(quant_config)
        k, n = in_features, out_features
        return {
            "qweight": TensorSpec(("I32",), (k // PER_WORD, n)),
            "qzeros": TensorSpec(("I32",), (k // g, n // PER_WORD)),
            "scales": TensorSpec(("F16", "BF16"), (k // g, n)),
            "g_idx": TensorSpec(("I32",), (k,)),
        }

    def quantize(self, weight: torch.Tensor, quant_config: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        """Round-to-nearest GPTQ packing (no calibration); symmetric unless the
        config says ``sym: false``. Scales are rounded to fp16 first so the
        stored tensors dequantize exactly to what the reference computes."""
        g = _group(quant_config)
        sym = (quant_config or {}).get("sym", True)
        n, k = weight.shape
        if k % g or k % PER_WORD or n % PER_WORD:
            raise ValueError(f"GPTQ needs in_features % {g} == 0 and dims % 8 == 0, got [{n}, {k}]")
        w = weight.to(torch.float64).t().reshape(k // g, g, n)  # [groups, g, N]
        if sym:
            amax = w.abs().amax(dim=1)
            scale = _fp16_scale(2 * amax / MAXQ)
            zero = torch.full_like(amax, 8, dtype=torch.int64)
        else:
            lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
            # v1 cannot store zero point 0 (it stores zero - 1), so the top of
            # the range is at most 14.5 steps above zero when the group is >= 0
            scale = _fp16_scale(torch.maximum((hi - lo) / MAXQ, hi / (MAXQ - 0.5)))
            zero = torch.round(-lo / scale.to(torch.float64)).clamp(1, MAXQ).to(torch.int64)
        s64 = scale.to(torch.float64)
        q = torch.round(w / s64.unsqueeze(1)) + zero.unsqueeze(1)
        q = q.clamp(0, MAXQ).to(torch.int64).reshape(k, n)
        return {
            "qweight": pack_int4(q, dim=0),
            "qzeros": pack_int4(zero - 1, dim=1),  # v1 layout stores zero - 1
            "scales": scale.contiguous(),
            "g_idx": (torch.arange(k) // g).to(torch.int32),
        }

    def dequantize(
        self, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        q = unpack_int4(tensors["qweight"], dim=0)  # [K, N]
        k = q.shape[0]
        zeros = unpack_int4(tensors["qzeros"], dim=1) + 1  # [G, N]
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            g_idx = torch.arange(k) // _group(quant_config)
        g_idx = g_idx.to(torch.int64)
        scales = tensors["scales"].to(dtype)
        w = (q - zeros[g_idx]).to(dtype) * scales[g_idx]
        return w.t()


GPTQ_INT4 = GptqInt4()
