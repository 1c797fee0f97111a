"""The ``vllm-mixed`` command. Bad input exits with status 2 and one message
naming the culprit; ``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from vllm_mixed.bench import add_bench_arguments
from vllm_mixed.errors import MixedError
from vllm_mixed.evaluate import add_eval_arguments

__all__ = ["main"]


def human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int] | None = None) -> str:
    right = right or set()
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells[1:])])


def cmd_plan(args: argparse.Namespace) -> int:
    from vllm_mixed.plan import build_plan, open_sources, plan_summary, pure_plan
    from vllm_mixed.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    sources = open_sources(recipe)
    plan = build_plan(recipe, sources)
    pure = {name: pure_plan(recipe, sources, name) for name in sources}
    summary = plan_summary(plan, pure)
    checks = None
    if args.tp is not None or args.ep:
        from dataclasses import asdict

        from vllm_mixed.tp_constraints import Parallel, raise_on_failures

        parallel = Parallel(tp=args.tp or 1, ep=args.ep)
        checks = plan.shard_checks(parallel)
        summary["parallel"] = {"tensor_parallel_size": parallel.tp, "expert_parallel": parallel.ep}
        summary["shards"] = [{**asdict(c), "verdict": c.verdict} for c in checks]
    if args.json:
        print(json.dumps(summary, indent=2))
        if checks is not None:
            raise_on_failures(checks, parallel)
        return 0
    print(
        f"recipe {args.recipe}: {len(plan.layers)} layers, {summary['tensors']} tensors, base {recipe.base!r}, dtype {recipe.dtype}"
    )
    print(table(["source", "format", "path"], [(n, s.format, s.path) for n, s in sources.items()]))
    print()
    rows = [
        (
            g["group"],
            g["source"],
            g["format"],
            g["precision"],
            g["layers"],
            g["bytes"],
            human(g["bytes"]),
            g["vllm_method_gpu"],
            g["vllm_method_cpu"],
        )  # fmt: skip
        for g in summary["groups"]
    ]
    headers = ["group", "source", "format", "precision", "layers", "bytes", "", "vLLM method (CUDA)", "(CPU build)"]
    print(table(headers, rows, right={4, 5, 6}))
    print()
    prec = [(p, b, human(b)) for p, b in sorted(summary["bytes_by_precision"].items())]
    prec.append(("total", plan.total_bytes, human(plan.total_bytes)))
    print(table(["precision", "bytes", ""], prec, right={1, 2}))
    print()
    vs = [(n, b, human(b), f"{plan.total_bytes / b:.3f}" if b else "-") for n, b in summary["pure_sources"].items()]
    print(table(["all from source", "bytes", "", "this recipe / it"], vs, right={1, 2, 3}))
    for rule in summary["unused_rules"]:
        print(
            f"warning: rule {rule['index']} (targets {rule['targets']} -> {rule['source']}) matches no layer",
            file=sys.stderr,
        )
    print(
        "note: on the CPU build quantized layers are dequantized to the model dtype at load (memory = the bf16 footprint)."
    )
    if checks is not None:
        print()
        print(f"per-rank shards at {parallel}, against vLLM 0.26 (CUDA, Hopper) kernels:")
        rows = [(c.group, c.layer, c.format, c.shard, c.kernel, c.verdict) for c in checks]
        print(table(["group", "layer", "format", "shard per rank", "vLLM kernel", "verdict"], rows))
        for c in checks:
            if c.status == "fallback":
                print(f"note: {c.fallback_note}")
        raise_on_failures(checks, parallel)
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from vllm_mixed.compose import compose
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe

    plan = build_plan(load_recipe(args.recipe))
    out = compose(plan, args.output)
    print(
        f"composed {out} ({len(plan.layers)} layers from {len(plan.sources)} sources, {human(plan.total_bytes)} of weights)"
    )
    print(f"serve it: python -m vllm.entrypoints.openai.api_server --model {out} --load-format mixed")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a composed directory with vLLM (the demo's last step)."""
    import time

    from vllm_mixed.composition import Composition
    from vllm_mixed.plan import build_plan

    cfg_path = Path(args.model) / "config.json"
    if not cfg_path.is_file():
        raise MixedError(f"{args.model}: no config.json; pass a directory written by `vllm-mixed compose`")
    comp = Composition.from_dict(json.loads(cfg_path.read_text()).get("quantization_config") or {})
    plan = build_plan(comp.recipe)
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=args.model, load_format="mixed", max_model_len=args.max_model_len, enforce_eager=True,
              gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
    ready = time.perf_counter() - start
    out = llm.generate([args.prompt], SamplingParams(max_tokens=args.max_tokens, temperature=0.0))[0]
    print(f"\nprompt:    {args.prompt!r}\ngenerated: {out.outputs[0].text!r}")
    print(f"tokens:    {list(out.outputs[0].token_ids)}   (engine ready in {ready:.1f} s)\n")
    rows = [(p, b, human(b)) for p, b in sorted(plan.bytes_by_precision().items())]
    rows.append(("total", plan.total_bytes, human(plan.total_bytes)))
    print(table(["precision", "weight bytes read", ""], rows, right={1, 2}))
    if _on_cpu():
        elements = sum(math.prod(m.shape) for p in plan.layers for m in p.layer.members)
        size = elements * (2 if plan.recipe.dtype in ("bfloat16", "float16") else 4)
        print(
            f"resident on this CPU: {size} B ({human(size)}): the CPU build dequantizes to {plan.recipe.dtype} at load"
        )
    return 0


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``5GB``, ``500MiB`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def cmd_export(args: argparse.Namespace) -> int:
    from vllm_mixed.export import cmd_export as run  # compressed-tensors: imported only when used

    return run(args)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from vllm_mixed.tiny import make_tiny

    dirs = make_tiny(args.dir, seed=args.seed)
    for name, path in dirs.items():
        print(f"{name:10s} {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-mixed", description="Serve one model composed layer by layer from several checkpoints."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="validate a recipe against its checkpoints and print the load plan")
    p.add_argument("recipe")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--tp",
        type=positive_int,
        metavar="N",
        help="check each layer group's shard at tensor_parallel_size N against the kernel vLLM 0.26 (CUDA) picks "
        "(default 1 with --ep); exit status 2 if vLLM would refuse it",
    )
    p.add_argument(
        "--ep",
        "--enable-expert-parallel",
        dest="ep",
        action="store_true",
        help="as vLLM's --enable-expert-parallel: each rank holds whole experts instead of a slice of every expert",
    )
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("compose", help="write a small servable directory whose config.json carries the recipe")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.set_defaults(func=cmd_compose)
    p = sub.add_parser("generate", help="generate text from a composed directory with vLLM (greedy)")
    p.add_argument("model", help="a directory written by `vllm-mixed compose`")
    p.add_argument("--prompt", default="Hello, world! The capital of France is")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=0.3, help="on the CPU build: the share of RAM for the KV cache"
    )
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("export", help="write one compressed-tensors checkpoint that stock vLLM serves")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", required=True, help="directory to write (new or empty)")
    p.add_argument("--shard-size", type=parse_size, default=5 * 10**9, help="about this much per shard (default 5GB)")
    p.set_defaults(func=cmd_export)
    add_bench_arguments(
        sub.add_parser(
            "bench", help="vLLM's offline throughput benchmark on the recipe and each pure source, one table"
        )
    )  # arguments after `--` go to `vllm bench throughput`
    add_eval_arguments(
        sub.add_parser(
            "eval", help="KL, top-1 agreement and perplexity of a recipe against a reference source, on vLLM"
        )
    )
    p = sub.add_parser("make-tiny", help="write a tiny random Qwen3-MoE in the three published formats plus a recipe")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)
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
