"""``vllm-mixed make-tiny DIR``: a tiny random Qwen3-MoE in the three
published formats plus a recipe."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-tiny", help="write a tiny random Qwen3-MoE in the three published formats plus a recipe"
    )
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vllm_mixed.tiny import make_tiny

    dirs = make_tiny(args.dir, seed=args.seed)
    for name, path in dirs.items():
        print(f"{name:10s} {path}")
    return 0
