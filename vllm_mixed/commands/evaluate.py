"""``vllm-mixed eval RECIPE --prompts FILE [--against SOURCE] [--json]``: KL,
top-1 agreement and perplexity of a recipe against a reference source, on
vLLM (:mod:`vllm_mixed.evaluate`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_mixed.evaluate import EvalReport

__all__ = ["add_parser", "cmd_eval", "format_report", "run"]


def _top_k(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give K >= 1, or 0 for the whole vocabulary")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="KL, top-1 agreement and perplexity of a recipe against a reference source, on vLLM"
    )
    parser.add_argument("recipe")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line; or .jsonl of "
                        '{"prompt": ...} / {"token_ids": [...]}')  # fmt: skip
    parser.add_argument("--against", metavar="SOURCE", help="reference source name (default: the first unquantized)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--top-k", type=_top_k, default=20, help="logprobs per position (default 20: approximate "
                        "KL over the union of both top-K sets); 0: the whole vocabulary, exact KL")  # fmt: skip
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                        help="share of GPU memory vLLM may take (default 0.3 suits the CPU build; ~0.9 on a GPU)")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per vLLM run (default 3600)")
    parser.add_argument("--workdir", help="keep the composed models, logs and raw logprobs here (default: a temp dir)")
    parser.set_defaults(func=run)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from vllm_mixed.evaluate import EngineSettings, evaluate, load_prompts

    settings = EngineSettings(
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        tensor_parallel_size=args.tensor_parallel_size,
        timeout_s=args.timeout,
    )
    prompts = load_prompts(args.prompts)
    report = evaluate(
        args.recipe,
        prompts,
        against=args.against,
        top_k=args.top_k,
        settings=settings,
        workdir=args.workdir,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


run = cmd_eval  # the command interface's name; the function keeps the name the tests and tracebacks show


def format_report(report: EvalReport) -> str:
    """The human-readable table of ``eval``."""
    from vllm_mixed.text import human, table

    s = report.scores
    rows = [
        ("perplexity", f"{s.ppl_recipe:.4f}", f"{s.ppl_reference:.4f}", f"{s.ppl_delta:+.4f} ({s.ppl_delta_rel:+.2%})"),
        ("weights", human(report.weight_bytes["recipe"]), human(report.weight_bytes["reference"]), ""),
        ("engine start (s)", f"{report.init_s['recipe']:.1f}", f"{report.init_s['reference']:.1f}", ""),
    ]
    lines = [
        f"recipe     {report.recipe}",
        f"reference  source {report.reference!r} ({report.reference_path}) as a pure recipe",
        f"prompts    {report.prompts} ({s.positions} scored positions, teacher-forced)",
        "",
        table(["", "recipe", "reference", "delta"], rows, right={1, 2, 3}),
        "",
        f"KL(reference || recipe)  mean {s.kl_mean:.6g} nats/token, max {s.kl_max:.6g}",
        f"top-1 agreement          {s.top1_agreement:.2%} ({s.top1_agree}/{s.positions})",
        f"KL is {s.kl_method}",
    ]
    if report.top_k:
        lines.append(
            f"the reference's top-{report.top_k} holds {s.reference_mass:.1%} of its probability on average: "
            "the nearer 100%, the nearer the exact KL"
        )
    return "\n".join(lines)
