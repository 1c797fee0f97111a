"""``vllm-mixed generate DIR``: greedy generation from a composed directory
with vLLM (the demo's last step)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text from a composed directory with vLLM (greedy)")
    p.add_argument("model", help="a directory written by `vllm-mixed compose`")
    p.add_argument("--prompt", default="Hello, world! The capital of France is")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=0.3, help="on the CPU build: the share of RAM for the KV cache"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from vllm_mixed.composition import Composition
    from vllm_mixed.errors import MixedError
    from vllm_mixed.plan import build_plan
    from vllm_mixed.text import human, table

    cfg_path = Path(args.model) / "config.json"
    if not cfg_path.is_file():
        raise MixedError(f"{args.model}: no config.json; pass a directory written by `vllm-mixed compose`")
    comp = Composition.from_dict(json.loads(cfg_path.read_text()).get("quantization_config") or {})
    plan = build_plan(comp.recipe)
    from vllm import LLM, SamplingParams

    from vllm_mixed.vllm_compat import is_cpu

    start = time.perf_counter()
    llm = LLM(model=args.model, load_format="mixed", max_model_len=args.max_model_len, enforce_eager=True,
              gpu_memory_utilization=args.gpu_memory_utilization,
              worker_extension_cls="vllm_mixed.resident.ResidentExtension")  # fmt: skip
    ready = time.perf_counter() - start
    out = llm.generate([args.prompt], SamplingParams(max_tokens=args.max_tokens, temperature=0.0))[0]
    print(f"\nprompt:    {args.prompt!r}\ngenerated: {out.outputs[0].text!r}")
    print(f"tokens:    {list(out.outputs[0].token_ids)}   (engine ready in {ready:.1f} s)\n")
    rows = [(p, b, human(b)) for p, b in sorted(plan.bytes_by_precision().items())]
    rows.append(("total", plan.total_bytes, human(plan.total_bytes)))
    print(table(["precision", "weight bytes read", ""], rows, right={1, 2}))
    if is_cpu():
        for report in llm.collective_rpc("vllm_mixed_resident"):
            if report:
                print(resident_text(report, plan.recipe.dtype))
    return 0


def resident_text(report: dict, dtype: str) -> str:
    """The CPU build's measured weight memory (``vllm_mixed.resident``)
    against the plan's prediction, for people."""
    from vllm_mixed.text import human

    held, predicted = report["held"], report["predicted"]
    heap = f", the heap grew {human(report['heap_growth'])}" if report.get("heap_growth") is not None else ""
    return (
        f"resident on this CPU: {held} B ({human(held)}) of weights held after loading{heap}; the plan predicts "
        f"{predicted} B ({held / max(predicted, 1) - 1:+.2%}). vLLM's CPU kernels keep their layers packed, the "
        f"layers they have none for are dequantized to {dtype} at load (the load log names each)"
    )
