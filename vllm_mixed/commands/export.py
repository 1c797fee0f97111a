"""``vllm-mixed export RECIPE -o DIR [--shard-size 5GB]``: one merged
compressed-tensors checkpoint that stock vLLM serves without the plugin."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def _size(text: str) -> int:
    from vllm_mixed.text import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write one compressed-tensors checkpoint that stock vLLM serves")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", required=True, help="directory to write (new or empty)")
    p.add_argument("--shard-size", type=_size, default="5GB", help="about this much per shard (default 5GB)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json

    from vllm_mixed.checkpoint_writer import INDEX
    from vllm_mixed.export import export  # compressed-tensors: imported only when used
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.text import human

    plan = build_plan(load_recipe(args.recipe))
    out = export(plan, args.output, shard_bytes=args.shard_size)
    index = json.loads((out / INDEX).read_text())
    shards = len(set(index["weight_map"].values()))
    print(f"exported {out}: {human(index['metadata']['total_size'])} in {shards} shards (compressed-tensors)")
    by_precision = sorted(plan.bytes_by_precision().items())
    width = max(len(prec) for prec, _ in by_precision)
    for prec, nbytes in by_precision:
        print(f"  {prec:{width}s}  {human(nbytes)} read from the sources")
    print(f"serve it with stock vLLM: vllm serve {out}")
    return 0
