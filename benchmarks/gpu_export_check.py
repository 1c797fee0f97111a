# ruff: noqa: E402
"""Stock vLLM (no plugin) serves what `vllm-mixed export` writes: on the lent
GPU, each exported compressed-tensors checkpoint of the tiny model must give
the same greedy tokens as its oracle (stock vLLM on the single checkpoint for
pure recipes, the plugin for mixes) and stay near the float32 reference.

Usage (device, after `. benchmarks/device_setup.sh`): python3 benchmarks/gpu_export_check.py $OUT
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_oracle as go

from vllm_mixed.compose import compose
from vllm_mixed.export import export

out_final, work = Path(sys.argv[1]), Path("/tmp/export-check")
rows_dir = work / "rows"
rows_dir.mkdir(parents=True, exist_ok=True)
E = {"targets": ["model.layers.*.mlp.experts"], "source": "int4"}
A = {"targets": ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"], "source": "fp8"}
recipes = {
    "all-fp8": ("fp8", []),
    "all-int4": ("int4", []),
    "mix": ("bf16", [E]),
    "int4-exp-fp8-attn": ("bf16", [E, A]),
}
plans = go.tiny_plans(work, recipes)
exported = {name: export(plan, work / f"export-{name}", progress=False) for name, plan in plans.items()}
for name in ("mix", "int4-exp-fp8-attn"):
    compose(plans[name], work / f"composed-{name}")
rows = [("stock-fp8", work / "tiny/fp8", "auto"), ("stock-gptq", work / "tiny/gptq-int4", "auto")]
rows += [(f"export-{n}", exported[n], "auto") for n in recipes]
rows += [(f"plugin-{n}", work / f"composed-{n}", "mixed") for n in ("mix", "int4-exp-fp8-attn")]
# stock rows with int4 experts on the backend the plugin picks for them here, so that kernels match
INT4_BACKEND = go.plugin_backend("gptq_int4")
res = {}
for name, model, fmt in rows:
    int4 = fmt == "auto" and any(k in name for k in ("gptq", "int4", "mix"))
    res[name] = go.run(name, model, fmt, rows_dir, moe_backend=INT4_BACKEND if int4 else "auto")
    (out_final / "export-check.json").write_text(
        json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "teacher"} for k, v in res.items()}, indent=1)
    )
oracle = {
    "all-fp8": "stock-fp8",
    "all-int4": "stock-gptq",
    "mix": "plugin-mix",
    "int4-exp-fp8-attn": "plugin-int4-exp-fp8-attn",
}
print("\nexport              ok    same greedy as     top1 vs fp32 ref  worst|dlogprob|  kernels")
for n in recipes:
    r = res[f"export-{n}"]
    if not r["ok"]:
        print(f"{n:18s} FAILED")
        continue
    o = res.get(oracle[n], {})
    same = (r["tokens"] == o["tokens"]) if o.get("ok") else "oracle failed"
    top1, gap = go.vs_reference(plans[n], r["teacher"])
    print(f"{n:18s} ok    {oracle[n]}={same}  {top1:.3f}  {gap:.3f}  {'; '.join(r['kernels'][:5])}")
for n in ("stock-fp8", "stock-gptq", "plugin-mix", "plugin-int4-exp-fp8-attn"):
    print(n, res[n]["ok"], "; ".join(res[n].get("kernels", [])[:4]))
import subprocess

subprocess.run(["tar", "czf", str(out_final / "logs.tar.gz"), "-C", str(rows_dir), "."])
