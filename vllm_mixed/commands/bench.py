"""``vllm-mixed bench RECIPE [--vs SOURCE ...] [--plot PNG] [--json] [-- VLLM_ARGS]``:
vLLM's own offline throughput benchmark on the recipe and each named pure
source (:mod:`vllm_mixed.bench`), one table, optionally a PNG."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_mixed.bench import BenchRow

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``bench`` flags. Defaults suit the tiny model on a small CPU; on a
    GPU pass real sizes. Everything after ``--`` goes to vLLM unchanged."""
    parser = subparsers.add_parser(
        "bench", help="vLLM's offline throughput benchmark on the recipe and each pure source, one table"
    )
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument(
        "--vs", action="append", default=[], metavar="SOURCE",
        help="also bench all weights from this source of the recipe (repeat, comma-separate, or 'all')",
    )  # fmt: skip
    parser.add_argument("--plot", metavar="PNG", help="write weight memory against output tok/s as a PNG")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout (the table goes to stderr)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--random-input-len", type=int, default=64)
    parser.add_argument("--random-output-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.3, help="on the CPU build: the share of RAM for the KV cache"
    )
    parser.add_argument(
        "--enforce-eager", action="store_true",
        help="no torch.compile/CUDA graphs (on a small CPU this saves ~45 s per row)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per row (default 1200)")
    parser.add_argument("--work-dir", help="keep composed dirs, logs and vLLM's JSON here (default: a temp dir)")
    parser.set_defaults(vllm_args=[], func=run)
    parser.epilog = (
        "Arguments after `--` are passed to `vllm bench throughput` for every row, e.g. -- --max-num-seqs 64"
    )
    _split_passthrough(parser)
    return parser


def _split_passthrough(parser: argparse.ArgumentParser) -> None:
    """Set aside everything after the first ``--`` before the subcommand
    parses: argparse cannot mix a positional, options and a ``--`` tail
    (``nargs='*'`` and ``REMAINDER`` each misparse it, Python 3.10-3.13)."""
    parse = parser.parse_known_args

    def parse_known_args(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        args = list(sys.argv[1:] if args is None else args)
        tail: list[str] = []
        if "--" in args:
            cut = args.index("--")
            args, tail = args[:cut], args[cut + 1 :]
        ns, extra = parse(args, namespace)
        ns.vllm_args = [*getattr(ns, "vllm_args", []), *tail]
        return ns, extra

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    """Compose and bench every row, print one table (or JSON), optionally plot."""
    from vllm_mixed.bench import BenchSettings, run_bench

    settings = BenchSettings(
        num_prompts=args.num_prompts, random_input_len=args.random_input_len,
        random_output_len=args.random_output_len, seed=args.seed, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        timeout_s=args.timeout, vllm_args=tuple(args.vllm_args),
    )  # fmt: skip
    rows = run_bench(
        args.recipe, args.vs, settings, args.work_dir, progress=lambda msg: print(msg, file=sys.stderr, flush=True)
    )
    flags = settings.vllm_flags()
    backend = _plot(rows, args.plot, Path(args.recipe).name) if args.plot else None
    text = _report(rows, flags, args.plot, backend)
    if args.json:
        print(text, file=sys.stderr)
        report = {
            "recipe": str(args.recipe),
            "vllm_bench_args": flags,
            "rows": [asdict(r) for r in rows],
            "plot": args.plot,
            "plot_backend": backend,
        }
        print(json.dumps(report, indent=2))
    else:
        print(text)
    return 0


def _plot(rows: list[BenchRow], path: str, recipe_name: str) -> str:
    from vllm_mixed.bench import WEIGHT_NOTES
    from vllm_mixed.plot import write_plot

    unit, scale = ("GiB", 2**30) if max(r.weight_bytes for r in rows) >= 2**30 else ("MiB", 2**20)
    froms = sorted({r.weight_from for r in rows})
    return write_plot(
        [(r.name, r.weight_bytes / scale, r.output_tok_s) for r in rows], path,
        x_label=f"weight memory, {unit} ({' / '.join(WEIGHT_NOTES[f][0] for f in froms)})",
        y_label="output tok/s", title=f"vllm bench throughput: {recipe_name}",
    )  # fmt: skip


def _report(rows: list[BenchRow], flags: list[str], plot: str | None, backend: str | None) -> str:
    """The table and its notes."""
    from vllm_mixed.bench import LOAD_NOTES, WEIGHT_NOTES
    from vllm_mixed.text import human, table

    headers = ["row", "output tok/s", "total tok/s", "req/s", "weight", "weight from", "load s", "load from"]
    body = [
        (
            r.name, f"{r.output_tok_s:.1f}", _num(r.total_tok_s, 1), _num(r.requests_s, 2),
            human(r.weight_bytes), r.weight_from, _num(r.load_s, 2), r.load_from or "-",
        )
        for r in rows
    ]  # fmt: skip
    lines = [table(headers, body, right={1, 2, 3, 4, 6}), ""]
    lines.append("vllm bench throughput, the same for every row: " + " ".join(flags))
    for f in sorted({r.weight_from for r in rows}):
        lines.append(f"weight ({f}): {WEIGHT_NOTES[f][1]}")
    cpu_rows = [r for r in rows if r.resident_predicted_bytes is not None]
    for r in cpu_rows:
        held = "not logged" if r.resident_bytes is None else f"{human(r.resident_bytes)} held after loading (measured)"
        lines.append(
            f"resident on the CPU build, {r.name}: {held}, {human(r.resident_predicted_bytes)} predicted by the plan"
        )
    if cpu_rows:
        lines.append(
            "resident (CPU build): layers vLLM's CPU build has kernels for stay packed, the others are dequantized to "
            "the model dtype at load; the vocabulary embeddings are held twice (weight and oneDNN-packed copy)"
        )
    for f in sorted({r.load_from for r in rows if r.load_from}):
        lines.append(f"load s ({f}): {LOAD_NOTES[f]}")
    if plot:
        lines.append(f"plot: {plot} ({backend})")
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
