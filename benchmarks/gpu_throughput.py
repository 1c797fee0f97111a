#!/usr/bin/env python3
"""Full-shape Qwen3-30B-A3B rows on the lent GPU with vLLM's own offline
benchmarks, random weights (``--load-format dummy``), identical prompts and
engine flags for every row.

``--bench throughput``: ``vllm bench throughput``, 256 random prompts of
1024 in / 256 out; ``decode``: 256 x 128/1024; ``capped``: 512 x 2048/512
with vLLM given 48 GiB of the card (the KV cache, not the kernels, limits
the batch; the row records vLLM's maximum concurrency). ``--bench latency``: ``vllm bench latency`` at batch 1
(32 in / 256 out), reported as ms per output token against the HBM floor
(bytes each decode step must read, over the copy bandwidth measured here).

Rows: stock BF16, stock FP8 block, stock GPTQ-Int4, stock GPTQ with only the
experts quantized (mix A's kernels), a compressed-tensors config with int4
experts and FP8-block attention (mix B's kernels, written by the project's
exporter), and through the plugin mix A and mix B (composed from header-true
sparse checkpoints, so ``plan`` and ``compose`` run on the real shape). A row
name may carry ``@humming`` (``--moe-backend humming``), ``@marlin``,
``@wna16`` (``--quantization moe_wna16``, stock GPTQ dirs only, with a flat
``modules_in_block_to_quantize``) or
``@deepgemm`` (DeepGEMM on; every other row runs with ``VLLM_USE_DEEP_GEMM=0``),
and ``#N`` to repeat a row.

Integer weights are filled by ``benchmarks/bench_hooks.py`` (vLLM leaves
them uninitialised in dummy mode); the tokenizer is a word-level one over the
model's full 151,936-token vocabulary, so prompts and detokenisation cover the
real vocabulary.

Usage (device): python3 benchmarks/gpu_throughput.py --out $OUT --rows stock-gptq-experts,mix-a
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_hooks import parse_load_probe  # noqa: E402

from vllm_mixed.processes import run_isolated  # noqa: E402
from vllm_mixed.testing.published import published_config  # noqa: E402

# the model shape (a published config in vllm_mixed/testing/published): Qwen3-30B-A3B unless
# VLLM_MIXED_BENCH_SHAPE names another Qwen3-MoE, e.g. qwen3-235b-a22b for the multi-GPU rows
SHAPE = os.environ.get("VLLM_MIXED_BENCH_SHAPE", "qwen3-30b-a3b")
CONFIG = published_config(SHAPE)
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
    "stock-gptq": {**GPTQ, "modules_in_block_to_quantize": [ATTN, ["mlp.experts"]]},
    "stock-gptq-experts": {**GPTQ, "modules_in_block_to_quantize": [["mlp.experts"]]},
}
# which plan gives a row's bytes (weights and the decode floor)
PLAN_OF = {
    "stock-bf16": "bf16", "stock-fp8": "fp8", "stock-gptq": "int4", "stock-gptq-experts": "mix-a",
    "stock-ct-mixb": "mix-b", "mix-a": "mix-a", "mix-b": "mix-b",
}  # fmt: skip
ENGINE = [
    "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.85",
    "--attention-backend", "TRITON_ATTN", "--max-num-seqs", "256", "--seed", "0",
]  # fmt: skip
BENCH = {
    "throughput": ["--num-prompts", "256", "--random-input-len", "1024", "--random-output-len", "256"],
    # the decode-heavy regime of the kernel issue: short prompts, long answers
    "decode": ["--num-prompts", "256", "--random-input-len", "128", "--random-output-len", "1024"],
    # the memory-capped regime: vLLM gets 48 GiB of the card (CAPPED_GIB); stock FP8's 29 GiB of weights
    # leave it little KV cache, so the rows differ in how many of the 512 sequences run at once
    "capped": ["--num-prompts", "512", "--random-input-len", "2048", "--random-output-len", "512"],
    "latency": ["--batch-size", "1", "--input-len", "32", "--output-len", "256", "--num-iters-warmup", "2",
                "--num-iters", "5"],
}  # fmt: skip
CAPPED_GIB = 48
# engine flags that differ per regime (replacing ENGINE's); the capped utilization is computed per card
ENGINE_FOR = {"capped": {"--max-model-len": "2560", "--max-num-seqs": "512", "--gpu-memory-utilization": None}}
VARIANTS = {
    "humming": (["--moe-backend", "humming"], {}),
    "marlin": (["--moe-backend", "marlin"], {}),
    "wna16": (["--quantization", "moe_wna16"], {}),
    "deepgemm": ([], {"VLLM_USE_DEEP_GEMM": "1"}),
    # DeepGEMM without vLLM's start-up JIT of every M (797 kernels, past a 10-minute call on a fresh machine):
    # CUDA-graph capture and each regime's untimed pass compile the kernels its timed pass then uses
    "deepgemm-lazy": ([], {"VLLM_USE_DEEP_GEMM": "1", "VLLM_DEEP_GEMM_WARMUP": "skip"}),
    # Humming's two MoE GEMM forms and its FP8-activation mode (env only: on whichever rows run Humming,
    # the plugin's own choice for int4 experts on Hopper)
    "grouped": ([], {"VLLM_HUMMING_MOE_GEMM_TYPE": "grouped"}),
    "indexed": ([], {"VLLM_HUMMING_MOE_GEMM_TYPE": "indexed"}),
    "a8": ([], {"VLLM_HUMMING_INPUT_QUANT_CONFIG": '{"input_dtype": "float8e4m3"}'}),
}
VOCAB = CONFIG["vocab_size"]


def write_full_vocab_tokenizer(directory: Path) -> None:
    """A word-level tokenizer with one token per model vocabulary id ("t0" ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    eos = f"t{CONFIG.get('eos_token_id', 151645)}"
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": eos,
                "pad_token": eos,
                "model_max_length": 40960,
                "clean_up_tokenization_spaces": False,
            }
        )  # fmt: skip
    )


def model_dirs(work: Path) -> tuple[dict[str, Path], dict[str, object]]:
    import yaml
    from compressed_tensors.compressors import ModelCompressor

    from vllm_mixed.compose import compose
    from vllm_mixed.export import plan_schemes
    from vllm_mixed.plan import build_plan, pure_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.testing.full_shape import write_sparse_checkpoint

    tok = work / "tokenizer"
    if not tok.exists():
        write_full_vocab_tokenizer(tok)
    sparse = work / "sparse"
    if not sparse.exists():
        for fmt in ("bf16", "fp8", "gptq-int4"):
            write_sparse_checkpoint(sparse, fmt, config=CONFIG)
    src = {"bf16": str(sparse / "bf16"), "fp8": str(sparse / "fp8"), "int4": str(sparse / "gptq-int4")}
    experts = {"targets": ["model.layers.*.mlp.experts"], "source": "int4"}
    attention = {"targets": ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"], "source": "fp8"}
    plans, dirs = {}, {}
    for name, rules in {"mix-a": [experts], "mix-b": [experts, attention]}.items():
        path = work / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump({"sources": src, "base": "bf16", "default": "bf16", "dtype": "bfloat16", "rules": rules})
        )
        plans[name] = build_plan(load_recipe(path))
        dirs[name] = compose(plans[name], work / name)
    for name in ("bf16", "fp8", "int4"):
        plans[name] = pure_plan(plans["mix-a"].recipe, plans["mix-a"].sources, name)
    for name, qc in {**STOCK, "stock-ct-mixb": "ct"}.items():
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(CONFIG)
        if isinstance(qc, dict):
            cfg["quantization_config"] = qc
        (d / "config.json").write_text(json.dumps(cfg))
        if qc == "ct":  # compressed-tensors' own config for mix B's kernels, as `vllm-mixed export` writes it
            ModelCompressor(quantization_config=plan_schemes(plans["mix-b"])[1]).update_config(str(d))
        dirs[name] = d
        if isinstance(qc, dict) and "modules_in_block_to_quantize" in qc:
            # vLLM 0.26's moe_wna16 builds its GPTQ config without flattening the published nested list
            # (gptq_utils.is_layer_gptq_quantized then fails); the flat list means the same to both paths
            flat = work / f"{name}-flat"
            flat.mkdir(parents=True, exist_ok=True)
            mods = [m for block in qc["modules_in_block_to_quantize"] for m in block]
            (flat / "config.json").write_text(
                json.dumps({**cfg, "quantization_config": {**qc, "modules_in_block_to_quantize": mods}})
            )
            dirs[f"{name}-flat"] = flat
    for d in dirs.values():
        for f in tok.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
    return dirs, plans


def decode_bytes(plan, context_tokens: int) -> int:
    """Bytes one batch-1 decode step reads: every dense weight, top-k of the
    experts, one embedding row, and the KV cache of the context."""
    top_k, n_exp = CONFIG["num_experts_per_tok"], CONFIG["num_experts"]
    total = 0
    for p in plan.layers:
        if p.layer.kind == "experts":
            total += p.nbytes * top_k // n_exp
        elif p.layer.kind == "embedding":
            total += p.nbytes // VOCAB
        else:
            total += p.nbytes
    kv = LAYERS * 2 * CONFIG["num_key_value_heads"] * CONFIG["head_dim"] * 2 * context_tokens
    return total + kv


def plan_verdicts(recipe: Path, tp: int, ep: bool) -> dict:
    """``vllm-mixed plan --tp N [--ep] --json``: what the plugin predicts vLLM builds per layer group."""
    cmd = [sys.executable, "-m", "vllm_mixed.cli", "plan", str(recipe), "--json", "--tp", str(tp)] + (
        ["--ep"] if ep else []
    )
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    try:
        return {"rc": r.returncode, "plan": json.loads(r.stdout)}
    except json.JSONDecodeError:
        return {"rc": r.returncode, "stderr": r.stderr[-1500:]}


def hbm_copy_gbs() -> float:
    """Device-to-device copy bandwidth (read + write bytes), in its own process."""
    code = (
        "import torch,time;a=torch.empty(2**31,dtype=torch.uint8,device='cuda');b=torch.empty_like(a)\n"
        "for _ in range(3): b.copy_(a)\n"
        "torch.cuda.synchronize();t=time.perf_counter()\n"
        "for _ in range(20): b.copy_(a)\n"
        "torch.cuda.synchronize();print(2*20*a.numel()/(time.perf_counter()-t)/1e9)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def parse_row(spec: str) -> tuple[str, str | None]:
    base = spec.split("#")[0]
    name, _, variant = base.partition("@")
    if name not in PLAN_OF or (variant and variant not in VARIANTS):
        raise SystemExit(f"unknown row {spec!r}: rows {sorted(PLAN_OF)}, variants {sorted(VARIANTS)}")
    return name, variant or None


def engine_flags(bench: str) -> list[str]:
    """ENGINE with the regime's own values; the capped regime's
    ``--gpu-memory-utilization`` gives vLLM CAPPED_GIB of this card."""
    flags = list(ENGINE)
    for key, value in ENGINE_FOR.get(bench, {}).items():
        if value is None:  # the utilization for CAPPED_GIB, asked of the card in a process of its own
            code = "import torch;print(torch.cuda.mem_get_info()[1])"
            total = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            value = f"{CAPPED_GIB * 2**30 / total:.4f}"
        flags[flags.index(key) + 1] = value
    return flags


def log_facts(text: str) -> dict:
    """What an engine's log says it built: weights (GiB, per rank), the KV
    cache's concurrency, the plugin's method per layer group (with its
    backend notes), and vLLM's kernel and backend choices."""
    m = re.search(r"Model loading took ([\d.]+) GiB", text)
    c = re.search(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", text)
    kernels = sorted(set(re.findall(r"Using '?(\w+)'? (?:WNA16 MoE backend|Fp8 MoE backend|backend)", text)))
    kernels += sorted(set(re.findall(r"Selected (\w+) for (\w+)", text)))
    kernels += sorted(set(re.findall(r"Using (\w+) gemm for humming moe", text)))
    return {
        "weights_gib": float(m.group(1)) if m else None,
        "max_concurrency": float(c.group(1)) if c else None,  # what the KV cache allows (the capped regime)
        "methods": sorted(set(re.findall(r"vllm-mixed: (.+? via \w+)", text))),
        "kernels": kernels,
        "moe_choices": sorted(set(re.findall(r"\[moe backend ([^\]]+)\]", text))),
    }


def run_row(spec: str, model: Path, bench: str, out: Path, timeout: int) -> dict:
    name, variant = parse_row(spec)
    extra, env_extra = VARIANTS[variant] if variant else ([], {})
    tag = re.sub(r"[^\w.-]", "_", spec)
    log, js = out / f"{bench}-{tag}.log", out / f"{bench}-{tag}.json"
    env = {**os.environ, "VLLM_USE_DEEP_GEMM": "0", "VLLM_MIXED_BENCH_INT_FILL": "1", "VLLM_MIXED_BENCH_LOAD_PROBE": "1",
           **env_extra}  # fmt: skip
    sub = "latency" if bench == "latency" else "throughput"  # vLLM's benchmark; the others are throughput regimes
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", sub, "--model", str(model),
           *engine_flags(bench), *BENCH[bench], *extra, "--output-json", str(js)]  # fmt: skip
    t0 = time.perf_counter()
    rc = run_isolated(cmd, log, timeout, env)
    rc = "timeout" if rc is None else rc
    text = log.read_text(errors="replace")
    row: dict = {"row": spec, "bench": bench, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    m = re.search(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s", text)
    if m:
        row["requests_s"], row["total_tok_s"], row["output_tok_s"] = map(float, m.groups())
    if bench == "latency" and js.exists():
        r = json.loads(js.read_text())
        row["avg_latency_s"] = r.get("avg_latency")
        row["ms_per_token"] = round(1000 * r["avg_latency"] / 256, 3) if r.get("avg_latency") else None
    row |= log_facts(text)
    probe = parse_load_probe(text)
    if probe:  # GPU memory during the load (dummy weights, then process_weights_after_loading) against after it
        row["load_peak_gib"], row["load_resident_gib"] = probe["peak_gib"], probe["resident_gib"]
    if rc != 0:
        row["tail"] = text[-3000:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="stock-gptq-experts,mix-a")
    ap.add_argument(
        "--bench",
        choices=sorted(BENCH),
        default="throughput",
        help="throughput: 256 x 1024/256; decode: 256 x 128/1024; capped: 512 x 2048/512 in 48 GiB; latency: batch 1",
    )
    ap.add_argument("--work", default="/tmp/vllm-mixed-bench")
    ap.add_argument("--timeout", type=int, default=330)
    ap.add_argument("--budget-s", type=int, default=560, help="start no row after this many seconds minus 100")
    args = ap.parse_args()
    start = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    specs = args.rows.split(",")
    for s in specs:
        parse_row(s)
    dirs, plans = model_dirs(work)
    hbm = hbm_copy_gbs() if args.bench == "latency" else None
    results_path = out / f"{args.bench}.json"
    rows = []
    for spec in specs:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 100:
            rows.append({"row": spec, "bench": args.bench, "rc": "skipped: call budget"})
            continue
        name, _ = parse_row(spec)
        _, variant = parse_row(spec)
        model = dirs[f"{name}-flat"] if variant == "wna16" else dirs[name]
        row = run_row(spec, model, args.bench, out, min(args.timeout, int(left)))
        plan = plans[PLAN_OF[name]]
        row["plan_gib"] = round(plan.total_bytes / 2**30, 2)
        if hbm:
            floor = decode_bytes(plan, 32 + 128) / (hbm * 1e9)
            row["hbm_gbs"], row["floor_ms"] = round(hbm, 1), round(1000 * floor, 3)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tail"}), flush=True)
        if "tail" in row:
            print(row["tail"], flush=True)
        results_path.write_text(json.dumps(rows, indent=1))
    results_path.write_text(json.dumps(rows, indent=1))
    key = "ms_per_token" if args.bench == "latency" else "output_tok_s"
    print(f"\n{'row':28s}{key:>14}  {'total tok/s':>11}  {'weights GiB':>11}  {'plan GiB':>8}  {'floor ms':>8}  wall s")
    for r in rows:
        print(
            f"{r['row']:28s}{r.get(key) or '-':>14}  {r.get('total_tok_s') or '-':>11}  {r.get('weights_gib') or '-':>11}"
            f"  {r.get('plan_gib', '-'):>8}  {r.get('floor_ms', '-'):>8}  {r.get('wall_s', r['rc'])}"
        )


if __name__ == "__main__":
    main()
