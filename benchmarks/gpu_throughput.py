#!/usr/bin/env python3
"""Full-shape Qwen3-30B-A3B throughput on the lent GPU with vLLM's own
offline benchmark (`vllm bench throughput`), random weights
(`--load-format dummy`), identical prompts and flags for every row.

Rows: stock BF16, stock FP8 block, stock GPTQ-Int4, stock GPTQ with only the
experts quantized (mix A's kernels), and through the plugin mix A and mix B
(composed from header-true sparse checkpoints, so `plan` and `compose` run on
the real shape; the dummy loader then fills the weights).

Usage (device): python3 benchmarks/gpu_throughput.py --out $OUT --rows mix-a,stock-gptq-experts
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = json.loads((ROOT / "benchmarks" / "qwen3-30b-a3b-config.json").read_text())
LAYERS = CONFIG["num_hidden_layers"]
ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
GPTQ = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 128,
    "desc_act": False,
    "sym": True,
    "checkpoint_format": "gptq",
}
FP8 = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    "modules_to_not_convert": ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in range(LAYERS)],
}  # fmt: skip
STOCK = {
    "stock-bf16": None,
    "stock-fp8": FP8,
    "stock-gptq": {**GPTQ, "modules_in_block_to_quantize": [ATTN]},
    "stock-gptq-experts": {**GPTQ, "modules_in_block_to_quantize": [["mlp.experts"]]},
}
FLAGS = [
    "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.85",
    "--attention-backend", "TRITON_ATTN", "--max-num-seqs", "256", "--num-prompts", "256",
    "--random-input-len", "1024", "--random-output-len", "256", "--seed", "0",
]  # fmt: skip


def model_dirs(work: Path) -> dict[str, Path]:
    import yaml

    from tests.full_shape import write_sparse_checkpoint
    from vllm_mixed.compose import compose
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.tiny import write_tokenizer

    tok = work / "tokenizer"
    write_tokenizer(tok)
    dirs = {}
    for name, qc in STOCK.items():
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(CONFIG)
        if qc:
            cfg["quantization_config"] = qc
        (d / "config.json").write_text(json.dumps(cfg))
        dirs[name] = d
    sparse = work / "sparse"
    if not sparse.exists():
        for fmt in ("bf16", "fp8", "gptq-int4"):
            write_sparse_checkpoint(sparse, fmt)
    src = {"bf16": str(sparse / "bf16"), "fp8": str(sparse / "fp8"), "int4": str(sparse / "gptq-int4")}
    experts = {"targets": ["model.layers.*.mlp.experts"], "source": "int4"}
    attention = {"targets": ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"], "source": "fp8"}
    plans = {}
    for name, rules in {"mix-a": [experts], "mix-b": [experts, attention]}.items():
        path = work / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump({"sources": src, "base": "bf16", "default": "bf16", "dtype": "bfloat16", "rules": rules})
        )
        plans[name] = build_plan(load_recipe(path))
        dirs[name] = compose(plans[name], work / name)
    for d in dirs.values():
        for f in tok.iterdir():
            shutil.copyfile(f, d / f.name)
    return dirs, {n: p.total_bytes for n, p in plans.items()}


def bench(name: str, model: Path, out: Path, timeout: int) -> dict:
    log = out / f"{name}.log"
    js = out / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "bench",
        "throughput",
        "--model",
        str(model),
        *FLAGS,
        "--output-json",
        str(js),
    ]
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            try:
                os.killpg(proc.pid, 9)  # the engine core must not hold the GPU for the next row
            except ProcessLookupError:
                pass
            time.sleep(3)
    text = log.read_text()
    row = {"row": name, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    if js.exists():
        r = json.loads(js.read_text())
        row["output_tok_s"] = (
            round(r.get("tokens_per_second", 0) * 256 / 1280, 1)
            if "output_tokens_per_second" not in r
            else r["output_tokens_per_second"]
        )
        row["total_tok_s"] = r.get("tokens_per_second")
        row["requests_s"] = r.get("requests_per_second")
    m = re.search(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s", text)
    if m:
        row["requests_s"], row["total_tok_s"], row["output_tok_s"] = map(float, m.groups())
    m = re.search(r"Model loading took ([\d.]+) GiB", text)
    row["weights_gib"] = float(m.group(1)) if m else None
    row["methods"] = sorted(set(re.findall(r"vllm-mixed: (.+? via \w+)", text)))
    row["kernels"] = sorted(set(re.findall(r"Using (\w+) (?:for|kernel|backend|MoE)", text)))
    if rc != 0:
        row["tail"] = text[-2500:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="stock-gptq-experts,mix-a")
    ap.add_argument("--work", default="/tmp/vllm-mixed-bench")
    ap.add_argument("--timeout", type=int, default=330)
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    dirs, planned = model_dirs(work)
    rows = []
    for name in args.rows.split(","):
        row = bench(name, dirs[name], out, args.timeout)
        if name in planned:
            row["plan_gib"] = round(planned[name] / 2**30, 2)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tail"}), flush=True)
        if "tail" in row:
            print(row["tail"], flush=True)
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
    print("\nrow                 output tok/s  total tok/s  weights GiB  plan GiB  wall s")
    for r in rows:
        print(
            f"{r['row']:20s}{r.get('output_tok_s') or '-':>12}  {r.get('total_tok_s') or '-':>11}  {r.get('weights_gib') or '-':>11}  {r.get('plan_gib', '-'):>8}  {r['wall_s']:>6}"
        )


if __name__ == "__main__":
    main()
