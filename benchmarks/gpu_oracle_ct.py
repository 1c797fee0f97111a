#!/usr/bin/env python3
"""compressed-tensors sources against stock vLLM on the lent GPU: what the
CPU build cannot run here (MoE experts in CT W4A16 / FP8 have no CPU kernel
without AMX; FP8 block linears neither).

Writes the tiny Qwen3-MoE in CT W4A16 (group 128, symmetric), CT FP8
(per-channel weights, dynamic per-token activations: ``make-tiny``'s
``ct-fp8``), and three more CT variants written with the project's writers
(W4A16 asymmetric group 64, FP8 per-tensor with static activations, FP8
block 128x128), then runs stock vLLM on each directory and the plugin's
pure recipe of each (``load_format="mixed"``), each in its own process.
Checks: identical greedy tokens and teacher-forced logprobs within 1e-5
(the same vLLM kernels), the methods the plugin logged; and the mix
(experts CT W4A16, attention CT FP8, rest BF16) against the float32
reference (FP8 activations are quantized on the GPU: tolerance, not
identity).

Usage (device, after the bundle's env.sh): python3 benchmarks/gpu_oracle_ct.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_oracle import max_gap, run, vs_reference  # noqa: E402  (its child process serves each row)

VARIANTS = {  # directory -> (format module object name, quantization_config factory arguments)
    "ct-w4a16-asym-g64": ("w4a16", {"group_size": 64, "symmetric": False}),
    "ct-fp8-tensor-static": ("fp8", {"weights": "tensor", "activations": "static"}),
    "ct-fp8-block": ("fp8", {"weights": "block"}),
}


def write_variants(tiny: Path) -> dict[str, Path]:
    """The extra CT checkpoints of the same master weights (make-tiny's seed)."""
    from vllm_mixed.checkpoint_writer import write_checkpoint
    from vllm_mixed.formats import FORMATS
    from vllm_mixed.formats.ct_fp8 import fp8_config
    from vllm_mixed.formats.ct_w4a16 import w4a16_config
    from vllm_mixed.tiny import TINY_CONFIG, checkpoint_config, checkpoint_tensors, master_weights, write_tokenizer

    master = master_weights(dict(TINY_CONFIG), 0)
    out = {}
    for name, (kind, kwargs) in VARIANTS.items():
        base = FORMATS["ct_w4a16" if kind == "w4a16" else "ct_fp8"]
        qc = w4a16_config(**kwargs) if kind == "w4a16" else fp8_config(**kwargs)

        class Variant(type(base)):  # the same format with another published quantization_config
            tiny = type(base.tiny)(name, qc, base.tiny.float_dtype, name)

        fmt = Variant()
        write_checkpoint(tiny / name, checkpoint_tensors(dict(TINY_CONFIG), master, fmt),
                         checkpoint_config(dict(TINY_CONFIG), fmt), 2 * 2**20)  # fmt: skip
        write_tokenizer(tiny / name)
        out[name] = tiny / name
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/vllm-mixed-oracle-ct")
    ap.add_argument("--checkpoints", default="ct-w4a16,ct-fp8," + ",".join(VARIANTS) + ",mix",
                    help="the checkpoints whose pure recipe runs against stock vLLM, and mix: the mix's row")  # fmt: skip
    args = ap.parse_args()
    import yaml

    from vllm_mixed.compose import compose
    from vllm_mixed.formats import UNQUANTIZED
    from vllm_mixed.formats.ct_fp8 import CT_FP8
    from vllm_mixed.formats.ct_w4a16 import CT_W4A16
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.tiny import make_tiny

    final, work = Path(args.out), Path(args.work)
    final.mkdir(parents=True, exist_ok=True)
    rows_dir = work / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    tiny = work / "tiny"
    make_tiny(tiny, formats=(UNQUANTIZED, CT_W4A16, CT_FP8))
    dirs = {"ct-w4a16": tiny / "ct-w4a16", "ct-fp8": tiny / "ct-fp8", **write_variants(tiny)}
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
        row = {"checkpoint": name, "ok": mixed["ok"] and stock["ok"]}
        if row["ok"]:
            row |= {"same_greedy": mixed["tokens"] == stock["tokens"], "max_teacher_logprob_diff": max_gap(mixed, stock),
                    "methods": mixed["methods"], "kernels_mixed": mixed["kernels"],
                    "kernels_stock": stock["kernels"]}  # fmt: skip
        report["pure"].append(row)
    rules = [{"targets": ["model.layers.*.mlp.experts"], "source": "ct-w4a16"},
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
            print(f"{row['checkpoint']:22s}  FAILED")
            continue
        print(f"{row['checkpoint']:22s}  {row['same_greedy']!s:11s}  {row['max_teacher_logprob_diff']:.2e}")
        for m in row["methods"]:
            print(f"  {m}")
    print(f"mix vs fp32 reference: {report['mix']}")


if __name__ == "__main__":
    main()
