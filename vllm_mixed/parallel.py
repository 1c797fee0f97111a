"""How vLLM shards a model over ranks, as plain data: the layout
(:class:`Parallel`), one rank's slice of a linear (:class:`LinearShard`) and
the three verdicts a kernel rule gives. Shared by the formats' kernel rules
and ``tp_constraints``; no torch, no vLLM."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAILS", "FALLBACK", "HOPPER", "OK", "LinearShard", "Parallel"]

OK, FALLBACK, FAILS = "ok", "fallback", "fails"
HOPPER = 90  # CUDA compute capability of H100/H200 (sm90)


@dataclass(frozen=True)
class Parallel:
    """How vLLM shards the model. ``dp`` counts data-parallel (times
    prefill-context-parallel) ranks: without expert parallelism vLLM's MoE
    shards every expert over all dp*tp ranks
    (fused_moe/config.py:FusedMoEParallelConfig.flatten_tp_across_dp_and_pcp)."""

    tp: int = 1
    ep: bool = False
    dp: int = 1

    @property
    def use_ep(self) -> bool:
        """fused_moe/config.py:FusedMoEParallelConfig.make: EP needs more than one rank."""
        return self.ep and self.tp * self.dp > 1

    @property
    def moe_tp(self) -> int:
        """Ranks each expert is split over (1 with EP: whole experts per rank)."""
        return 1 if self.use_ep else self.tp * self.dp

    def __str__(self) -> str:
        extra = (f", data_parallel_size {self.dp}" if self.dp > 1 else "") + (", expert parallel" if self.ep else "")
        return f"tensor_parallel_size {self.tp}{extra}"


@dataclass(frozen=True)
class LinearShard:
    """One rank's slice of a linear layer: input features (of ``k_full``)
    and output features per fused member, and which way it is split."""

    k_full: int
    k: int
    parts: tuple[int, ...]
    row_split: bool
    col_split: bool
    note: str = ""

    @property
    def n(self) -> int:
        return sum(self.parts)

    def __str__(self) -> str:
        return f"[{self.k} -> {'+'.join(map(str, self.parts))}]{self.note}"
