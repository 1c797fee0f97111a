"""The ``vllm-mixed`` command: assembles the commands of
:mod:`vllm_mixed.commands`. Bad input exits with status 2 and one message
naming the culprit; ``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from vllm_mixed.commands import bench, compose, evaluate, export, fit, generate, make_tiny, plan, serve
from vllm_mixed.errors import MixedError

__all__ = ["COMMANDS", "build_parser", "main"]

# in the order `vllm-mixed --help` lists them
COMMANDS = (plan, compose, serve, generate, export, bench, evaluate, fit, make_tiny)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-mixed", description="Serve one model composed layer by layer from several checkpoints."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MixedError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"vllm-mixed: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
