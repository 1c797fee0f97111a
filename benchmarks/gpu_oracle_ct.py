#!/usr/bin/env python3
"""compressed-tensors sources against stock vLLM on the lent GPU: what the
CPU build cannot run here (MoE experts in CT W4A16 / FP8 have no CPU kernel
without AMX; FP8 block linears neither).

Writes the tiny model (``--arch``, default Qwen3-MoE) in CT W4A16 (group
128, symmetric), CT FP8 (per-channel weights, dynamic per-token activations)
and the three other published CT layouts ``make-tiny --formats`` writes
(W4A16 asymmetric group 64, FP8 per-tensor with static activations, FP8
block 128x128), then runs stock vLLM on each directory and the plugin's
pure recipe of each (``load_format="mixed"``), each in its own process.
Checks: identical greedy tokens and teacher-forced logprobs within 1e-5
(the same vLLM kernels), the methods the plugin logged; and the mix
(experts or MLP CT W4A16, attention CT FP8, rest BF16) against the float32
reference (FP8 activations are quantized on the GPU: tolerance, not
identity).

Usage (device, after the bundle's env.sh): python3 benchmarks/gpu_oracle_ct.py --out $OUT [--arch NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_oracle import max_gap, run, run_to_run, vs_reference  # noqa: E402  (its child process serves each row)

CT_VARIANTS = ("ct-w4a16-asym-g64", "ct-fp8-tensor-static", "ct-fp8-block")  # make-tiny directories


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/vllm-mixed-oracle-ct")
    ap.add_argument("--arch", default=None, help="make-tiny --arch name (default: the tiny Qwen3-MoE)")
    ap.add_argument("--checkpoints", default="ct-w4a16,ct-fp8," + ",".join(CT_VARIANTS) + ",mix",
                    help="the checkpoints whose pure recipe runs against stock vLLM, and mix: the mix's row")  # fmt: skip
    ap.add_argument("--repeat-stock", action="store_true",
                    help="run each stock row twice: the kernels' run-to-run gap beside the plugin's gap")  # fmt: skip
    args = ap.parse_args()
    import yaml

    from vllm_mixed.compose import compose
    from vllm_mixed.formats import TINY_VARIANTS, UNQUANTIZED
    from vllm_mixed.formats.ct_fp8 import CT_FP8
    from vllm_mixed.formats.ct_w4a16 import CT_W4A16
    from vllm_mixed.models import model_named
    from vllm_mixed.models.qwen3_moe import QWEN3_MOE
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.tiny import make_tiny

    final, work = Path(args.out), Path(args.work)
    final.mkdir(parents=True, exist_ok=True)
    rows_dir = work / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    tiny = work / "tiny"
    variants = tuple(f for f in TINY_VARIANTS if f.tiny.directory in CT_VARIANTS)
    written = make_tiny(tiny, arch=args.arch, formats=(UNQUANTIZED, CT_W4A16, CT_FP8, *variants))
    dirs = {name: written[name] for name in ("ct-w4a16", "ct-fp8", *CT_VARIANTS)}
    sources = {"bf16": str(tiny / "bf16"), **{k: str(v) for k, v in dirs.items()}}

    def plan_of(name: str, default: str, rules: list) -> object:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"sources": sources, "base": "bf16", "default": default,
                                        "dtype": "bfloat16", "rules": rules}))  # fmt: skip
        return build_plan(load_recipe(path))

    chosen = args.checkpoints.split(",")
    unknown = set(chosen) - {*dirs, "mix"}
    if unknown:
        raise SystemExit(f"unknown --checkpoints {sorted(unknown)}: of {sorted(dirs)} and mix")
    report = {"pure": [], "mix": None}
    for name, directory in [(n, d) for n, d in dirs.items() if n in chosen]:
        plan = plan_of(name, name, [])
        mixed = run(f"mixed-{name}", compose(plan, work / f"composed-{name}"), "mixed", rows_dir)
        stock = run(f"stock-{name}", directory, "auto", rows_dir)
        row = {"checkpoint": name, "ok": mixed["ok"] and stock["ok"], "mixed_ok": mixed["ok"], "stock_ok": stock["ok"]}
        if row["ok"]:
            row |= {"same_greedy": mixed["tokens"] == stock["tokens"], "max_teacher_logprob_diff": max_gap(mixed, stock),
                    "methods": mixed["methods"], "kernels_mixed": mixed["kernels"],
                    "kernels_stock": stock["kernels"]}  # fmt: skip
            gap = run_to_run(f"stock-{name}", directory, rows_dir, stock) if args.repeat_stock else None
            if gap is not None:
                row["stock_run_to_run"] = gap
        report["pure"].append(row)
    spec = model_named(args.arch) if args.arch else QWEN3_MOE  # its experts (or MLP) in W4A16, attention in FP8
    rules = [{"targets": list(spec.tiny_rules[0]["targets"]), "source": "ct-w4a16"},
             {"targets": ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"],
              "source": "ct-fp8"}]  # fmt: skip
    plan = plan_of("mix", "bf16", rules)
    mix = run("mixed-mix", compose(plan, work / "composed-mix"), "mixed", rows_dir) if "mix" in chosen else {}
    if mix.get("ok"):
        top1, worst = vs_reference(plan, mix["teacher"])
        report["mix"] = {"top1_vs_fp32_ref": top1, "worst_logprob_gap": worst, "methods": mix["methods"]}
    (final / "oracle_ct.json").write_text(json.dumps(report, indent=1))
    print("\ncheckpoint              same greedy  max |dlogprob| vs stock")
    for row in report["pure"]:
        if not row["ok"]:
            failed = " and ".join(side for side in ("mixed", "stock") if not row[f"{side}_ok"])
            print(f"{row['checkpoint']:22s}  FAILED ({failed})")
            continue
        print(f"{row['checkpoint']:22s}  {row['same_greedy']!s:11s}  {row['max_teacher_logprob_diff']:.2e}")
        if "stock_run_to_run" in row:
            print(f"  stock's second run against its first: {row['stock_run_to_run']}")
        for m in row["methods"]:
            print(f"  {m}")
    print(f"mix vs fp32 reference: {report['mix']}")


if __name__ == "__main__":
    main()
