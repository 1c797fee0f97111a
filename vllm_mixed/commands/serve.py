"""``vllm-mixed serve RECIPE_OR_DIR [vLLM serve arguments]``: compose a recipe
into the cache (reused while nothing changed, :mod:`vllm_mixed.serving`) and
run vLLM's OpenAI-compatible server on it with ``--load-format mixed``.
Everything after RECIPE_OR_DIR goes to vLLM untouched; SIGINT, SIGTERM and
SIGHUP go to the server, and its exit status is this command's."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        usage="%(prog)s [-h] RECIPE_OR_DIR [vLLM serve arguments ...]",
        help="vLLM's OpenAI-compatible server on a recipe (composed into a cache) or a composed directory",
    )
    parser.add_argument("target", metavar="RECIPE_OR_DIR", help="recipe YAML, or a directory written by `compose`")
    parser.set_defaults(vllm_args=[], func=run)
    parser.epilog = (
        "Every argument after RECIPE_OR_DIR goes to vLLM's server unchanged, e.g. --port 8000 --max-model-len 4096. "
        "Composed directories are cached under $VLLM_MIXED_CACHE, else $XDG_CACHE_HOME/vllm-mixed, "
        "else ~/.cache/vllm-mixed."
    )
    _split_after_target(parser)
    return parser


def _split_after_target(parser: argparse.ArgumentParser) -> None:
    """Parse only up to the first positional (RECIPE_OR_DIR) and keep the
    rest, untouched, for vLLM: its own flags are not ours to parse, and
    argparse's ``REMAINDER`` drops a ``--`` there."""
    parse = parser.parse_known_args

    def parse_known_args(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        args = list(sys.argv[1:] if args is None else args)
        cut = next((i + 1 for i, a in enumerate(args) if not a.startswith("-")), len(args))
        ns, extra = parse(args[:cut], namespace)
        ns.vllm_args = args[cut:]
        return ns, extra

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    from vllm_mixed.processes import run_forwarding_signals
    from vllm_mixed.serving import prepare, server_command

    prepared = prepare(args.target)
    said = {
        "given": "serving the composed directory {} as is",
        "reused": "reused the composed directory {} (recipe and source shards unchanged)",
        "written": "wrote the composed directory {}",
    }[prepared.action]
    print(f"vllm-mixed serve: {said.format(prepared.path)}", file=sys.stderr, flush=True)
    return run_forwarding_signals(server_command(prepared.path, args.vllm_args))
