"""``vllm-mixed fit``: the recipe of least KL within a memory budget, chosen by
measurement over a recipe's sources.

1. **Budget table** (headers only, any shape): every tied vLLM layer (the
   unit the fused-member rules tie: q/k/v, o_proj, router, one layer's
   experts, embeddings, lm_head, norms) and the bytes each source that can
   supply it would read (:func:`budget_table`). Options that read at least as
   many bytes as the reference are dropped: the reference's ΔKL is 0 and no
   KL is below 0, so they can never help.
2. **Measurement** (:func:`measure`, needs the weights): ΔKL(reference ||
   variant) when one unit alone comes from another source, for every
   remaining (unit, source). It runs in one process on transformers' own
   model class of the architecture (the project's independent reference) in
   float32 with each source's weights dequantized exactly: the reference
   model is built once, and each variant swaps that one unit's parameters in
   and back out, one teacher-forced pass over the prompts per variant. So
   the whole measurement costs no vLLM engine start at all; it isolates the
   weights' error, and the engine's own numerics enter at step 4.
3. **Solve** exactly (:mod:`vllm_mixed.fit_solver`): the predicted KL of a
   composition is the sum of its units' ΔKL (additive, first order).
4. **Verify on vLLM**: the reference, every pure source within the budget
   and the chosen recipe are scored with ``eval``'s engine runs (one fresh
   engine each, results cached in the work directory by routing), and the
   predicted KL is printed against the measured one. A chosen recipe measured
   worse than the best pure source within the budget is replaced by that
   source.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_mixed.fit_measure import BudgetTable, budget_table, measure, prompt_token_ids
from vllm_mixed.fit_solver import Point, pareto_front, solve
from vllm_mixed.recipe import Recipe, Rule, target_matches

__all__ = [
    "BudgetTable", "FitResult", "budget_table", "choice_of", "fit", "recipe_yaml", "routing_rules",
]  # fmt: skip

PARETO_ROWS = 12  # rows of the Pareto table written into the recipe


# --- recipes -------------------------------------------------------------------------------------------------


def routing_rules(choice: dict[str, str], default: str, layer_order: Sequence[str]) -> list[Rule]:
    """Rules giving every layer its chosen source (layers of ``default`` need
    none); a layer-index pattern whose layers all share one source becomes
    one glob (``model.layers.*.mlp.experts``)."""
    import re

    by_pattern: dict[str, list[str]] = {}
    for name in layer_order:
        by_pattern.setdefault(re.sub(r"\.layers\.\d+\.", ".layers.*.", name), []).append(name)
    targets: dict[str, list[str]] = {}
    for pattern, names in by_pattern.items():
        picked = {choice.get(n, default) for n in names}
        if len(picked) == 1 and len(names) > 1:
            (src,) = picked
            if src != default:
                targets.setdefault(src, []).append(pattern)
            continue
        for n in names:
            if choice.get(n, default) != default:
                targets.setdefault(choice[n], []).append(n)
    return [Rule(targets=t, source=s) for s, t in targets.items()]


def recipe_yaml(recipe: Recipe, rules: list[Rule], comments: list[str]) -> str:
    """An ordinary recipe file: the comment lines, then the keys."""
    lines = [f"# {c}" if c else "#" for c in comments]
    lines += ["sources:", *(f"  {n}: {p}" for n, p in recipe.sources.items())]
    lines += [f"base: {recipe.base}", f"default: {recipe.default}", f"dtype: {recipe.dtype}"]
    lines += ["rules:" if rules else "rules: []"]
    for r in rules:
        lines += [f"  - targets: {json.dumps(r.targets)}", f"    source: {r.source}"]
    return "\n".join(lines) + "\n"


def choice_of(recipe: Recipe, layer_order: Sequence[str]) -> dict[str, str]:
    """The source of every layer under a recipe (first rule that matches the layer name)."""
    out = {}
    for name in layer_order:
        src = recipe.default
        for rule in recipe.rules:
            if any(target_matches(t, name) for t in rule.targets):
                src = rule.source
                break
        out[name] = src
    return out


# --- verification on vLLM ------------------------------------------------------------------------------------


@dataclass
class Measured:
    name: str
    nbytes: int
    predicted_kl: float
    kl: float | None = None
    top1: float | None = None
    ppl: float | None = None


@dataclass
class FitResult:
    budget: int
    reference: str
    recipe_text: str
    chosen: Measured
    solver: Measured  # what the solver picked (== chosen unless a pure source won)
    pure: list[Measured] = field(default_factory=list)  # the pure sources within the budget, measured
    pure_all: list[Measured] = field(default_factory=list)  # every pure source (predicted; measured if within)
    hand: list[Measured] = field(default_factory=list)
    front: list[Point] = field(default_factory=list)
    returned_pure: str | None = None
    engine_runs: int = 0
    measured_variants: int = 0


class _Engine:
    """vLLM scoring of compositions, one fresh engine per distinct routing,
    cached under ``workdir/runs/<key>``."""

    def __init__(self, recipe: Recipe, prompts: Sequence[Any], top_k: int, settings: Any, workdir: Path,
                 progress: Callable[[str], None]):  # fmt: skip
        self.recipe, self.prompts, self.top_k, self.settings = recipe, list(prompts), top_k, settings
        self.workdir, self.say, self.runs = workdir, progress, 0
        self._ref: Any = None
        self.token_ids: list[list[int]] | None = None

    def _key(self, routes: dict[str, str]) -> str:
        body = json.dumps([routes, self.recipe.sources, self.recipe.dtype, self.prompts, self.top_k,
                           self.settings.llm_kwargs(self.recipe.dtype)], sort_keys=True)  # fmt: skip
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def result(self, recipe: Recipe, label: str) -> Any:
        from vllm_mixed.evaluate import EngineResult, run_engine
        from vllm_mixed.plan import build_plan

        plan = build_plan(recipe)
        run_dir = self.workdir / "runs" / self._key(plan.routes())
        if (run_dir / "result.json").is_file():
            return EngineResult.load(run_dir / "result.json")
        self.say(f"fit: scoring {label} on vLLM ...")
        self.runs += 1
        return run_engine(plan, self.prompts, self.top_k, self.settings, run_dir)

    def score(self, m: Measured, recipe: Recipe) -> Measured:
        from vllm_mixed.eval_metrics import score_positions

        if self._ref is None:
            self._ref = self.result(self.recipe, "the reference")
            if self.token_ids is not None and self._ref.prompt_token_ids != self.token_ids:
                self.say("fit: note: vLLM tokenized the prompts differently from the measurement (the base's "
                         "tokenizer in transformers); predicted and measured KL are then over different tokens")  # fmt: skip
        res = self.result(recipe, m.name)
        s = score_positions(res.prompt_token_ids, self._ref.positions, res.positions, res.vocab_size, res.top_k)
        m.kl, m.top1, m.ppl = s.kl_mean, s.top1_agreement, s.ppl_recipe
        return m


def fit(
    recipe_path: str | Path, budget: int, prompts: Sequence[Any], *, against: str | None = None, top_k: int = 0,
    settings: Any = None, workdir: str | Path | None = None, hand: Sequence[str | Path] = (),
    progress: Callable[[str], None] | None = None, measure_threads: int | None = 1,
) -> FitResult:  # fmt: skip
    """Measure, solve within ``budget`` bytes, verify on vLLM (see the module
    docstring). ``workdir`` keeps the engine runs for reuse (several budgets
    over one workdir start each engine once); ``hand`` adds recipes to
    report beside the pure sources (predicted; measured too when within
    the budget, like the pure sources)."""
    import tempfile

    from vllm_mixed.evaluate import EngineSettings, reference_source
    from vllm_mixed.plan import open_sources
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.text import human

    say = progress or (lambda _msg: None)
    settings = settings or EngineSettings()
    recipe = load_recipe(recipe_path)
    ref = reference_source(recipe, against, f"recipe {recipe_path}")
    sources = open_sources(recipe)
    table = budget_table(recipe, ref, sources)
    if budget < table.minimum:
        solve(table.solver_units({c: 0.0 for c in table.candidates()}), budget)  # raises, naming the minimum
    order = [u.layer for u in table.units]
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vllm-mixed-fit-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "measure.json"
    token_ids = prompt_token_ids(sources[recipe.base].path, prompts)
    key = hashlib.sha256(json.dumps([recipe.sources, ref, token_ids]).encode()).hexdigest()[:16]
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("key") == key:
        dkl = {(layer, s): v for layer, s, v in saved["dkl"]}
    else:
        say(f"fit: measuring {len(table.candidates())} (layer, source) variants against {ref!r} on transformers ...")
        dkl = measure(recipe, table, token_ids, sources, say, threads_used=measure_threads)
        cache.write_text(json.dumps({"key": key, "dkl": [[layer, s, v] for (layer, s), v in dkl.items()]}))
    units = table.solver_units(dkl)
    best = solve(units, budget)
    front = pareto_front(units)
    base_recipe = recipe.model_copy(update={"default": ref, "rules": []})

    def composed(choice: dict[str, str]) -> Recipe:
        return recipe.model_copy(update={"default": ref, "rules": routing_rules(choice, ref, order)})

    def predicted(choice: dict[str, str]) -> float:
        return math.fsum(dkl.get((n, s), 0.0) for n, s in choice.items() if s != ref)

    engine = _Engine(base_recipe, prompts, top_k, settings, work, say)
    engine.token_ids = token_ids
    pure, pure_all = [], []
    for name in table.sources:
        nbytes = table.pure_bytes(name)
        if nbytes is None:
            continue
        row = Measured(f"pure {name}", nbytes, predicted(dict.fromkeys(order, name)))
        pure_all.append(row)
        if nbytes <= budget:  # measured only where it is a candidate
            pure.append(engine.score(row, recipe.only(name)))
    hand_rows = []
    for path in hand:
        h = load_recipe(path)
        choice = choice_of(h, order)
        nbytes = sum(u.bytes_by_source[choice[u.layer]] for u in table.units)
        row = Measured(Path(path).stem, nbytes, predicted(choice))
        hand_rows.append(engine.score(row, h) if nbytes <= budget else row)  # measured where it is a candidate
    solved = engine.score(Measured("fit", best.nbytes, best.kl), composed(best.choice))
    chosen, returned_pure, final = solved, None, composed(best.choice)
    winner = min((p for p in pure if p.kl is not None), key=lambda p: p.kl, default=None)
    if winner is not None and winner.kl is not None and solved.kl is not None and solved.kl > winner.kl:
        returned_pure = winner.name.removeprefix("pure ")
        chosen, final = winner, recipe.only(returned_pure)
    comments = [
        f"vllm-mixed fit {recipe_path} --budget {budget} ({human(budget)}), reference {ref!r}",
        f"weights {chosen.nbytes} B ({human(chosen.nbytes)}); predicted KL {chosen.predicted_kl:.6g}, "
        f"measured KL {chosen.kl:.6g} nats/token on vLLM ({len(prompts)} prompts)",
    ]
    if returned_pure:
        comments.append(
            f"the solver's composition measured KL {solved.kl:.6g} (predicted {solved.predicted_kl:.6g}), worse than "
            f"pure {returned_pure}: this recipe is pure {returned_pure}"
        )
    comments += ["", "Pareto front of the measured ΔKL (predicted KL = sum of the layers' ΔKL):",
                 f"{'bytes':>14s}  {'size':>10s}  {'predicted KL':>12s}  layers not from {ref}"]  # fmt: skip
    step = max(1, math.ceil(len(front) / PARETO_ROWS))
    for p in front[::step] + ([front[-1]] if (len(front) - 1) % step else []):
        moved = sum(1 for s in p.choice.values() if s != ref)
        comments.append(f"{p.nbytes:>14d}  {human(p.nbytes):>10s}  {p.kl:>12.6g}  {moved}")
    comments.append("")
    text = recipe_yaml(final, list(final.rules), comments)
    return FitResult(
        budget=budget, reference=ref, recipe_text=text, chosen=chosen, solver=solved, pure=pure, pure_all=pure_all,
        hand=hand_rows, front=front, returned_pure=returned_pure, engine_runs=engine.runs, measured_variants=len(dkl),
    )  # fmt: skip
