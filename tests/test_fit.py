"""``vllm-mixed fit`` without vLLM: SIZE parsing, the exact solver against
brute force, the budget table at Qwen3-30B-A3B's real shape from headers
alone (totals from docs/qwen3-30b-a3b.md), the too-small-budget error, and
the written recipe routing every layer as chosen."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import yaml

from tests.test_full_shape_plan import BF16, FP8, GPTQ, MIX_A
from vllm_mixed.errors import MixedError
from vllm_mixed.fit import choice_of, recipe_yaml, routing_rules
from vllm_mixed.fit_measure import budget_table
from vllm_mixed.fit_solver import Option, Unit, minimum_bytes, pareto_front, parse_size, solve
from vllm_mixed.plan import build_plan, open_sources
from vllm_mixed.recipe import load_recipe, recipe_from_dict
from vllm_mixed.testing.full_shape import write_sparse_checkpoint


@pytest.mark.parametrize(
    ("text", "expected"),
    [("12MiB", 12 * 2**20), ("18GiB", 18 * 2**30), ("18.5GB", 18_500_000_000), ("123456789", 123456789),
     ("1.5 gib", 3 * 2**29), ("512kB", 512_000), ("7B", 7), (" 2TiB ", 2 * 2**40), ("0.5MB", 500_000)],
)  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12 MiBs", "GiB", "-5GB", "1.5", "0", "1e9", "12 mb extra", "0x10"])
def test_parse_size_rejects(text):
    with pytest.raises(MixedError, match="size"):
        parse_size(text)


def _brute(units, budget):
    best = None
    for combo in itertools.product(*(u.options for u in units)):
        nbytes = sum(o.nbytes for o in combo)
        kl = math.fsum(o.dkl for o in combo)
        if nbytes <= budget and (best is None or kl < best[0] - 1e-12):
            best = (kl, nbytes)
    return best


def _random_units(rng, n):
    units = []
    for i in range(n):
        ref = rng.randint(50, 200)
        opts = [Option("ref", ref, 0.0)]
        for s in ("fp8", "int4")[: rng.randint(1, 2)]:
            opts.append(Option(s, rng.randint(5, ref), rng.random() * rng.choice([0.01, 1.0])))
        units.append(Unit(f"u{i}", tuple(opts)))
    return units


@pytest.mark.parametrize("seed", range(12))
def test_solver_is_exact_against_brute_force(seed):
    rng = random.Random(seed)
    units = _random_units(rng, rng.randint(3, 8))
    least, most = minimum_bytes(units), sum(u.options[0].nbytes for u in units)
    for budget in sorted({least, rng.randint(least, most), rng.randint(least, most), most}):
        got = solve(units, budget)
        kl, _ = _brute(units, budget)
        assert got.nbytes <= budget
        assert got.kl == pytest.approx(kl, abs=1e-12)
        # the choice reproduces the reported bytes and KL
        by = {u.name: {o.source: o for o in u.options} for u in units}
        assert sum(by[n][s].nbytes for n, s in got.choice.items()) == got.nbytes
        assert math.fsum(by[n][s].dkl for n, s in got.choice.items()) == pytest.approx(got.kl, abs=1e-12)
    front = pareto_front(units)
    assert all(a.nbytes < b.nbytes and a.kl > b.kl for a, b in zip(front, front[1:]))
    assert front[0].nbytes == least and front[-1].kl == 0.0


def test_solver_too_small_budget_names_the_minimum():
    units = _random_units(random.Random(1), 4)
    least = minimum_bytes(units)
    with pytest.raises(MixedError, match=rf"below the smallest composition.* {least} B"):
        solve(units, least - 1)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-30b-a3b-fit")
    for name in ("bf16", "fp8", "gptq-int4"):
        write_sparse_checkpoint(root, name)
    path = root / "recipe.yaml"
    body = {"sources": {"bf16": str(root / "bf16"), "fp8": str(root / "fp8"), "int4": str(root / "gptq-int4")},
            "base": "bf16", "default": "bf16", "dtype": "bfloat16",
            "rules": [{"targets": ["model.layers.*.mlp.experts"], "source": "int4"}]}  # fmt: skip
    path.write_text(yaml.safe_dump(body))
    return load_recipe(path)


def test_budget_table_at_full_shape_from_headers(full):
    """The 30B-A3B budget table from headers alone: the pure totals are the
    published checkpoints', the minimum is every layer from its smallest
    source, and only cheaper-than-reference options are candidates."""
    table = budget_table(full, "bf16")
    assert {s: table.pure_bytes(s) for s in table.sources} == {"bf16": BF16, "fp8": FP8, "int4": GPTQ}
    assert len(table.units) == 1 + 48 * 8 + 2
    # the smallest is below pure int4: no layer kind is smaller in bf16/fp8 than in int4, but
    # routing every layer to its own smallest source is at most pure int4
    assert table.minimum <= GPTQ
    assert table.minimum == sum(min(u.bytes_by_source.values()) for u in table.units)
    kinds = {u.kind for u in table.units for (layer, _) in table.candidates_of(u) if layer == u.layer}
    assert kinds == {"linear", "experts"}  # norms, router, embeddings, lm_head are no cheaper anywhere
    assert len(table.candidates()) == 48 * 3 * 2  # qkv, o_proj, experts from fp8 and int4
    # a solver over fake ΔKL at full shape runs and respects the budget; too small names the minimum
    dkl = {c: (i % 7 + 1) * 1e-4 for i, c in enumerate(table.candidates())}
    units = table.solver_units(dkl)
    point = solve(units, 18 * 2**30)
    assert point.nbytes <= 18 * 2**30
    with pytest.raises(MixedError, match=str(table.minimum)):
        solve(units, table.minimum - 1)


def test_routing_rules_route_every_layer_as_chosen(full, tmp_path):
    """The written recipe loads, and plan routes each layer to the chosen
    source (globs where a whole layer kind agrees, names elsewhere); the hand
    recipe's choice read back gives mix A's bytes."""
    table = budget_table(full, "bf16")
    order = [u.layer for u in table.units]
    hand = choice_of(full, order)
    assert sum(u.bytes_by_source[hand[u.layer]] for u in table.units) == MIX_A
    choice = {n: ("int4" if n.endswith("mlp.experts") else "bf16") for n in order}
    choice["model.layers.3.self_attn.qkv_proj"] = "fp8"
    choice["model.layers.7.mlp.experts"] = "fp8"
    rules = routing_rules(choice, "bf16", order)
    targets = {t for r in rules for t in r.targets}
    assert "model.layers.*.mlp.experts" not in targets and "model.layers.3.self_attn.qkv_proj" in targets
    path = tmp_path / "out.yaml"
    path.write_text(recipe_yaml(full, rules, ["a comment", ""]))
    assert path.read_text().startswith("# a comment\n#\nsources:")
    plan = build_plan(load_recipe(path), open_sources(full))
    assert plan.routes() == choice
    all_int4 = routing_rules({n: "int4" if "experts" in n else "bf16" for n in order}, "bf16", order)
    assert [r.targets for r in all_int4] == [["model.layers.*.mlp.experts"]]
    assert recipe_from_dict(yaml.safe_load(recipe_yaml(full, all_int4, []))).rules == all_int4
