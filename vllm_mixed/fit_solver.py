"""The exact budget solver of ``vllm-mixed fit`` and its ``SIZE`` parser.

The problem is a multiple-choice knapsack: every unit (one tied vLLM layer)
takes exactly one of its options (a source, its bytes there, its measured
ΔKL), the total bytes must stay within the budget, the summed ΔKL is
minimized. It is solved exactly by dynamic programming over Pareto fronts:
after each unit, the partial compositions that are not dominated (no other
uses at most as many bytes with at most as much ΔKL) are kept, sorted by
bytes with strictly falling ΔKL. A dominated partial composition can always
be replaced by the one dominating it in any completion, so the optimum is on
the last front. Plain data, no torch; unit-tested against brute force.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vllm_mixed.errors import MixedError

__all__ = ["Option", "Point", "Unit", "minimum_bytes", "pareto_front", "parse_size", "solve"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``12MiB``, ``18GiB``, ``18.5GB``, ``512kB`` or a plain byte
    count (binary units: powers of 1024, decimal ones: powers of 1000)."""
    m = _SIZE.match(str(text))
    if not m:
        raise MixedError(
            f"size {text!r}: not a size; write bytes (123456789) or a number with a unit, e.g. 12MiB, 18GiB, 18.5GB"
        )
    number, unit = m.group(1), (m.group(2) or "").lower()
    if unit in ("", "b") and "." in number:
        raise MixedError(f"size {text!r}: a byte count is a whole number; write e.g. {int(float(number))} or 1.5GiB")
    value = round(float(number) * _UNITS[unit])
    if value <= 0:
        raise MixedError(f"size {text!r}: must be more than 0 bytes")
    return value


@dataclass(frozen=True)
class Option:
    source: str
    nbytes: int
    dkl: float


@dataclass(frozen=True)
class Unit:
    """One tied layer and the sources that can supply it."""

    name: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Point:
    """One composition: its bytes, its predicted KL (summed ΔKL) and the
    source of every unit."""

    nbytes: int
    kl: float
    choice: dict[str, str]


def minimum_bytes(units: Sequence[Unit]) -> int:
    """The smallest composition: every unit from its smallest option."""
    return sum(min(o.nbytes for o in u.options) for u in units)


def _fronts(units: Sequence[Unit], budget: int | None) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, ...]]]:
    """The last front (bytes, kl) and, per unit, the parent index and option
    index of each point of its front (for backtracking)."""
    fb = np.zeros(1, dtype=np.int64)
    fk = np.zeros(1, dtype=np.float64)
    steps = []
    for unit in units:
        if not unit.options:
            raise ValueError(f"unit {unit.name!r} has no option")
        n = len(fb)
        cb = np.concatenate([fb + o.nbytes for o in unit.options])
        ck = np.concatenate([fk + o.dkl for o in unit.options])
        parent = np.tile(np.arange(n), len(unit.options))
        opt = np.repeat(np.arange(len(unit.options)), n)
        if budget is not None:
            fits = cb <= budget
            cb, ck, parent, opt = cb[fits], ck[fits], parent[fits], opt[fits]
        order = np.lexsort((opt, ck, cb))  # by bytes, then ΔKL, then option order (deterministic ties)
        cb, ck, parent, opt = cb[order], ck[order], parent[order], opt[order]
        keep = np.ones(len(cb), dtype=bool)
        if len(cb) > 1:
            keep[1:] = ck[1:] < np.minimum.accumulate(ck)[:-1]
        fb, fk = cb[keep], ck[keep]
        steps.append((parent[keep], opt[keep]))
    return fb, fk, steps


def _choice(units: Sequence[Unit], steps: list[tuple[np.ndarray, ...]], index: int) -> dict[str, str]:
    choice = {}
    for unit, (parent, opt) in zip(reversed(units), reversed(steps)):
        choice[unit.name] = unit.options[int(opt[index])].source
        index = int(parent[index])
    return dict(reversed(list(choice.items())))


def pareto_front(units: Sequence[Unit], budget: int | None = None) -> list[Point]:
    """Every non-dominated composition (within ``budget`` bytes if given), by
    bytes ascending (and so ΔKL descending)."""
    fb, fk, steps = _fronts(units, budget)
    return [Point(int(fb[i]), float(fk[i]), _choice(units, steps, i)) for i in range(len(fb))]


def solve(units: Sequence[Unit], budget: int) -> Point:
    """The composition of least summed ΔKL within ``budget`` bytes (exact);
    a budget below the smallest composition is an error naming it."""
    least = minimum_bytes(units)
    if budget < least:
        from vllm_mixed.text import human

        raise MixedError(
            f"budget {budget} B ({human(budget)}) is below the smallest composition of these sources, {least} B "
            f"({human(least)}: every layer from its smallest source); raise --budget to at least {least} B"
        )
    fb, fk, steps = _fronts(units, budget)
    best = len(fb) - 1  # the front within the budget: most bytes, least ΔKL
    return Point(int(fb[best]), float(fk[best]), _choice(units, steps, best))
