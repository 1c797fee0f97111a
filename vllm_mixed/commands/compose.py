"""``vllm-mixed compose RECIPE -o DIR``: a small servable directory whose
config.json carries the recipe."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compose", help="write a small servable directory whose config.json carries the recipe")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vllm_mixed.compose import compose
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.text import human

    plan = build_plan(load_recipe(args.recipe))
    out = compose(plan, args.output)
    print(
        f"composed {out} ({len(plan.layers)} layers from {len(plan.sources)} sources, {human(plan.total_bytes)} of weights)"
    )
    print(f"serve it: python -m vllm.entrypoints.openai.api_server --model {out} --load-format mixed")
    return 0
