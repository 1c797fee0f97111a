"""``vllm-mixed fit RECIPE --budget SIZE --prompts FILE -o OUT.yaml [--against
SOURCE] [--plot PNG]``: the recipe of least measured KL over RECIPE's
sources whose weights fit SIZE (:mod:`vllm_mixed.fit`)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fit", help="the recipe of least measured KL over a recipe's sources within a memory budget"
    )
    p.add_argument("recipe", help="a recipe naming the sources to choose from (its rules are reported, not kept)")
    p.add_argument("--budget", required=True, help="weight bytes: 12MiB, 18GiB, 18.5GB or a byte count")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (or eval's .jsonl)")
    p.add_argument("-o", "--output", required=True, help="where to write the chosen recipe (YAML)")
    p.add_argument("--against", metavar="SOURCE", help="reference source (default: the first unquantized)")
    p.add_argument("--plot", metavar="PNG", help="draw the Pareto front (bytes against KL) to this PNG")
    p.add_argument("--also", metavar="RECIPE", action="append", default=[],
                   help="another hand recipe over the same sources to measure and mark (repeatable)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=0, help="vLLM logprobs per position for the measured KL "
                   "(default 0: the whole vocabulary, exact; 20 on large vocabularies)")  # fmt: skip
    p.add_argument("--workdir", help="keep the measurement and the engine runs here, reused by later runs")
    p.add_argument("--measure-threads", type=int, default=1, help="torch threads of the per-layer measurement "
                   "(default 1, right for small models; use the machine's cores for real ones)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per vLLM run")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from vllm_mixed.evaluate import EngineSettings, load_prompts
    from vllm_mixed.fit import fit
    from vllm_mixed.fit_solver import parse_size
    from vllm_mixed.text import human, table

    budget = parse_size(args.budget)
    settings = EngineSettings(
        max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size, timeout_s=args.timeout,
    )  # fmt: skip
    result = fit(
        args.recipe, budget, load_prompts(args.prompts), against=args.against, top_k=args.top_k, settings=settings,
        workdir=args.workdir, hand=[args.recipe, *args.also], measure_threads=args.measure_threads,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )  # fmt: skip
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.recipe_text)
    rows = [
        (m.name, m.nbytes, human(m.nbytes), "yes" if m.nbytes <= budget else "no", f"{m.predicted_kl:.6g}",
         f"{m.kl:.6g}" if m.kl is not None else "-", f"{m.top1:.2%}" if m.top1 is not None else "-")
        for m in [*result.pure, *result.hand, result.solver]
    ]  # fmt: skip
    print(table(["recipe", "bytes", "", "fits", "predicted KL", "measured KL", "top-1"], rows, right={1, 2, 4, 5, 6}))
    c = result.chosen
    print(f"\nbudget {budget} B ({human(budget)}), reference {result.reference!r}; {result.measured_variants} "
          f"variants measured, {result.engine_runs} vLLM runs")  # fmt: skip
    if result.returned_pure:
        print(f"the fitted composition measured worse than pure {result.returned_pure}: returning pure "
              f"{result.returned_pure} instead")  # fmt: skip
    print(f"wrote {out}: {c.nbytes} B ({human(c.nbytes)}), predicted KL {c.predicted_kl:.6g}, measured KL {c.kl:.6g}")
    if args.plot:
        from vllm_mixed.plot import write_plot

        mib = 2**20
        points = [("", p.nbytes / mib, p.kl) for p in result.front]
        points += [(m.name, m.nbytes / mib, m.kl if m.kl is not None else m.predicted_kl)
                   for m in [*result.pure_all, *result.hand, result.chosen]]  # fmt: skip
        write_plot(points, args.plot, x_label="weight MiB", y_label="KL (nats/token)",
                   title="fit: Pareto front (dots, predicted) and measured recipes")  # fmt: skip
        print(f"wrote {args.plot}")
    return 0
