"""``vllm-mixed plan RECIPE [--json] [--tp N] [--ep]``: the load plan, read
from safetensors headers only, and with ``--tp``/``--ep`` each layer group's
per-rank shard against the kernel vLLM picks for it."""

from __future__ import annotations

import argparse
import json
import sys

from vllm_mixed.vllm_compat import KERNEL_RULES_RELEASE

__all__ = ["add_parser", "run"]


def _on_cpu_build() -> bool:
    """Whether vLLM is installed here and its platform is the CPU (then the
    CPU column is this machine's prediction, asked of vLLM's kernel checks)."""
    from importlib.util import find_spec

    if find_spec("vllm") is None:
        return False
    from vllm_mixed.vllm_compat import is_cpu

    return is_cpu()


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="validate a recipe against its checkpoints and print the load plan")
    p.add_argument("recipe")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--tp",
        type=_positive_int,
        metavar="N",
        help=f"check each layer group's shard at tensor_parallel_size N against the kernel vLLM {KERNEL_RULES_RELEASE} "
        "(CUDA) picks (default 1 with --ep); exit status 2 if vLLM would refuse it",
    )
    p.add_argument(
        "--ep",
        "--enable-expert-parallel",
        dest="ep",
        action="store_true",
        help="as vLLM's --enable-expert-parallel: each rank holds whole experts instead of a slice of every expert",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from vllm_mixed.plan import build_plan, open_sources, plan_summary, pure_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.text import human, table
    from vllm_mixed.tp_constraints import Parallel, raise_on_failures

    recipe = load_recipe(args.recipe)
    sources = open_sources(recipe)
    plan = build_plan(recipe, sources)
    pure = {name: pure_plan(recipe, sources, name) for name in sources}
    cpu = _on_cpu_build()
    if cpu:
        from vllm_mixed.cpu_kernels import cpu_fallback_reason, cpu_method_name
    summary = plan_summary(plan, pure, cpu_method_name if cpu else None)
    if cpu:
        from vllm_mixed.cpu_kernels import cpu_resident_bytes

        summary["cpu_resident_bytes"] = cpu_resident_bytes(plan)  # what this CPU build will hold (README, "On a CPU")
    checks = None
    if args.tp is not None or args.ep:
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
            g["group"], g["source"], g["format"], g["precision"], g["layers"], g["bytes"], human(g["bytes"]),
            g["vllm_method_gpu"], g["moe_backend_gpu"] if g["moe_backend_gpu"] != "-" else g["linear_backend_gpu"],
            g["vllm_method_cpu"],
        )
        for g in summary["groups"]
    ]  # fmt: skip
    headers = [
        "group", "source", "format", "precision", "layers", "bytes", "", "vLLM method (CUDA)", "backend (Hopper)",
        "(CPU build)",
    ]  # fmt: skip
    print(table(headers, rows, right={4, 5, 6}))
    if any(g["moe_backend_gpu"].startswith(("humming", "marlin")) for g in summary["groups"]):
        print(
            "note: backend (Hopper): what the plugin asks of vLLM per experts group where the backend's package "
            "is installed (else vLLM's own choice), and a linear group's recipe kernels.<source>.linear_backend; "
            "--moe-backend / --linear-backend, or the recipe's kernels: section, overrides it"
        )
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
    if cpu:
        held = summary["cpu_resident_bytes"]
        print(f"on this CPU the model will hold {held} B ({human(held)}) of weights (the loader logs what it holds)")
        for g, src, fmt, kind in dict.fromkeys((p.layer.group, p.source, p.format, p.layer.kind) for p in plan.layers):
            why = cpu_fallback_reason(fmt, kind, sources[src].quant_config) if kind in ("linear", "experts") else None
            if why:
                print(f"note: on this CPU {g} ({fmt}) are dequantized to {recipe.dtype} at load (float memory): {why}")
    if checks is not None:
        print()
        print(f"per-rank shards at {parallel}, against vLLM {KERNEL_RULES_RELEASE} (CUDA, Hopper) kernels:")
        rows = [(c.group, c.layer, c.format, c.shard, c.kernel, c.verdict) for c in checks]
        print(table(["group", "layer", "format", "shard per rank", "vLLM kernel", "verdict"], rows))
        for c in checks:
            if c.status == "fallback":
                print(f"note: {c.fallback_note}")
        raise_on_failures(checks, parallel)
    return 0
