"""The numbers of ``vllm-mixed eval``, from teacher-forced prompt logprobs:
KL(reference || recipe) per position, top-1 agreement and perplexity.

Pure Python on plain data (token id -> logprob maps as vLLM returns them), so
it is unit-tested without vLLM.

KL needs both full distributions; vLLM returns the top-K logprobs of each
position (plus the actual next token). With K covering the vocabulary the KL
is exact. Otherwise it is taken over the union of both top-K sets plus one
"other" bucket holding each side's leftover mass: a token in one side's top-K
but not the other's gets, on the side that lacks it, the largest probability
its rank allows (at most that side's K-th probability, and together with the
other missing tokens less than that side's leftover mass). Lumping the tail
into one bucket can only lower the KL; the estimates of missing tokens may
move it either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vllm_mixed.errors import MixedError

__all__ = ["Scores", "kl_method", "position_kl", "score_positions", "top1"]

# Leftover mass of a truncated side below this is float32 rounding noise in
# 1 - sum(top-K probabilities); flooring it keeps missing tokens above zero.
MIN_REST = 1e-9

Dist = Mapping[int, float]  # token id -> logprob, as vLLM returns one position


@dataclass(frozen=True)
class Scores:
    """Everything ``eval`` reports about one recipe against its reference."""

    positions: int
    kl_mean: float
    kl_max: float
    top1_agreement: float
    top1_agree: int
    ppl_reference: float
    ppl_recipe: float
    ppl_delta: float
    ppl_delta_rel: float
    kl_method: str
    reference_mass: float  # mean probability mass of the reference's returned logprobs (1.0: full)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def position_kl(p: Dist, q: Dist, vocab_size: int, top_k: int = 0) -> float:
    """KL(p || q) in nats for one position (``top_k=0``: whole vocabulary)."""
    union = set(p) | set(q)
    n_other = vocab_size - len(union)
    pb, po = _buckets(p, union, vocab_size, top_k, n_other)
    qb, qo = _buckets(q, union, vocab_size, top_k, n_other)
    terms = [_term(pb[t], qb[t]) for t in union]
    if n_other > 0:
        terms.append(_term(po, qo))
    return math.fsum(terms)


def _buckets(dist: Dist, union: set[int], vocab_size: int, top_k: int, n_other: int) -> tuple[dict[int, float], float]:
    """One side's normalized probabilities on the union, and its "other"."""
    probs = {t: math.exp(lp) for t, lp in dist.items()}
    missing = [t for t in union if t not in probs]
    truncated = len(probs) < vocab_size
    rest = max(1.0 - math.fsum(probs.values()), MIN_REST) if truncated else 0.0
    if missing and truncated:
        ranked = sorted(probs.values(), reverse=True)
        kth = ranked[min(top_k, len(ranked)) - 1] if top_k > 0 else ranked[-1]
        each = min(kth, rest / (len(missing) + (1 if n_other > 0 else 0)))
        probs.update(dict.fromkeys(missing, each))
        rest -= each * len(missing)
    elif missing:  # cannot happen for a full side; keep the maths total
        probs.update(dict.fromkeys(missing, 0.0))
    other = rest if n_other > 0 else 0.0
    total = math.fsum(probs.values()) + other
    return {t: v / total for t, v in probs.items()}, other / total


def _term(a: float, b: float) -> float:
    if a <= 0.0:
        return 0.0
    if b <= 0.0:
        return math.inf
    return a * (math.log(a) - math.log(b))


def top1(dist: Dist) -> int:
    """The most likely token; ties (common with bf16 logits) go to the lower id."""
    return max(dist, key=lambda t: (dist[t], -t))


def kl_method(top_k: int, vocab_size: int, full: bool) -> str:
    """Says in the output which KL was computed."""
    if full:
        return f"exact: full distributions over the vocabulary ({vocab_size} tokens)"
    return (
        f"approximate: union of both top-{top_k} sets, each side's leftover mass in one 'other' bucket "
        f"(a token missing from one side's top-{top_k} gets the largest probability its rank allows); "
        "use --top-k 0 for the exact KL where the vocabulary is small enough"
    )


def score_positions(
    token_ids: Sequence[Sequence[int]],
    reference: Sequence[Sequence[Dist]],
    recipe: Sequence[Sequence[Dist]],
    vocab_size: int,
    top_k: int,
) -> Scores:
    """Scores over every scored position of every prompt (token-weighted).
    Position ``i`` of prompt ``n`` scores ``token_ids[n][i + 1]``."""
    kls: list[float] = []
    agree = 0
    nll_ref: list[float] = []
    nll_rec: list[float] = []
    mass: list[float] = []
    full = True
    for n, (ids, ref_rows, rec_rows) in enumerate(zip(token_ids, reference, recipe)):
        if not (len(ref_rows) == len(rec_rows) == max(len(ids) - 1, 0)):
            raise ValueError(
                f"prompt {n}: {len(ids)} tokens but {len(ref_rows)} reference and {len(rec_rows)} recipe positions"
            )
        for i, (p, q) in enumerate(zip(ref_rows, rec_rows)):
            actual = ids[i + 1]
            if actual not in p or actual not in q:
                raise ValueError(f"prompt {n} position {i + 1}: the actual token {actual} has no logprob")
            full = full and len(p) >= vocab_size and len(q) >= vocab_size
            mass.append(math.fsum(math.exp(v) for v in p.values()))
            kls.append(position_kl(p, q, vocab_size, top_k))
            agree += top1(p) == top1(q)
            nll_ref.append(-p[actual])
            nll_rec.append(-q[actual])
    if not kls:
        raise MixedError("no position to score: every prompt is a single token; give prompts of two tokens or more")
    ppl_ref = math.exp(math.fsum(nll_ref) / len(nll_ref))
    ppl_rec = math.exp(math.fsum(nll_rec) / len(nll_rec))
    return Scores(
        positions=len(kls),
        kl_mean=math.fsum(kls) / len(kls),
        kl_max=max(kls),
        top1_agreement=agree / len(kls),
        top1_agree=agree,
        ppl_reference=ppl_ref,
        ppl_recipe=ppl_rec,
        ppl_delta=ppl_rec - ppl_ref,
        ppl_delta_rel=ppl_rec / ppl_ref - 1.0,
        kl_method=kl_method(top_k, vocab_size, full),
        reference_mass=min(math.fsum(mass) / len(mass), 1.0),
    )
