#!/usr/bin/env python3
"""Oracle parity on the lent GPU (vLLM 0.26 from the device bundle).

Writes the tiny model in the three published formats with the project's own
writers, composes the four recipes, and runs each in its own process:
stock vLLM on the bf16 / fp8 / gptq directories, and the plugin
(``load_format="mixed"``) on all-bf16 / all-fp8 / all-int4 / mix. Checks:
pure recipes give exactly stock's greedy tokens (32 tokens, several prompts);
the mix is within the serve issue's tolerance of the float32 reference.

``--variants``: instead, the AWQ / act-order GPTQ / 8-bit GPTQ sources (the
tiny model written by this project's AWQ, GPTQ desc_act and GPTQ int8
writers): each pure recipe against stock vLLM on its single checkpoint
(same greedy tokens, teacher-forced logprob gap), and the mix (experts AWQ,
q/k/v act-order, o_proj int8, rest bf16) against the float32 reference --
the pairs vLLM's CPU build cannot run on a CPU without AMX.

Usage (device, after the bundle's env.sh): python3 benchmarks/gpu_oracle.py --out $OUT [--arch NAME | --kernels | --variants]
(``--arch``: a ``make-tiny --arch`` name; the mix is that architecture's tiny recipe)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from vllm_mixed.processes import run_isolated  # noqa: E402

_rng = random.Random(7)
PROMPTS = [[_rng.randrange(3, 1000) for _ in range(n)] for n in (6, 12, 20, 9)]
TEACHER = [[_rng.randrange(3, 1000) for _ in range(40)] for _ in range(3)]
MAX_TOKENS = 32


def child(model: str, load_format: str, out: str, tp: str = "1", moe_backend: str = "auto", ep: str = "0") -> None:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # on a CPU (a dry run of this script before device time is spent): vLLM's CPU defaults
    # on the GPU a fixed KV cache skips vLLM's memory profiling, so several oracle scripts can share the card
    device = {"attention_backend": "TRITON_ATTN", "gpu_memory_utilization": 0.08, "kv_cache_memory_bytes": 2**28}
    device = {**device, "skip_tokenizer_init": True} if torch.cuda.is_available() else {}  # 0.32 needs it on CPU
    t0 = time.perf_counter()
    llm = LLM(model=model, load_format=load_format, dtype="bfloat16", enforce_eager=True, max_model_len=512,
              max_num_seqs=8, seed=0, tensor_parallel_size=int(tp),
              moe_backend=moe_backend, enable_expert_parallel=ep == "1", **device)  # fmt: skip
    init = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], sp, use_tqdm=False)
    tf = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=20, detokenize=False)
    teach = llm.generate([TokensPrompt(prompt_token_ids=p) for p in TEACHER], tf, use_tqdm=False)
    res = {
        "init_s": init,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "teacher": [
            [{str(k): [v.logprob, v.rank] for k, v in lp.items()} for lp in o.prompt_logprobs[1:]] for o in teach
        ],
    }
    Path(out).write_text(json.dumps(res))
    llm.llm_engine.engine_core.shutdown()  # free the GPU before the next row starts
    os._exit(0)


def run(
    name: str, model: Path, load_format: str, out_dir: Path, tp: int = 1, moe_backend: str = "auto", ep: bool = False
) -> dict:
    out = out_dir / f"{name}.json"
    log = out_dir / f"{name}.log"
    t0 = time.perf_counter()
    argv = [
        sys.executable,
        __file__,
        "--child",
        str(model),
        load_format,
        str(out),
        str(tp),
        moe_backend,
        "1" if ep else "0",
    ]
    # at TP 1 the engine stays in the row's own process (no second vLLM import: ~10 s a row);
    # ORACLE_MULTIPROC=1 restores vLLM's default engine-core process
    env = dict(os.environ)
    if tp == 1 and os.environ.get("ORACLE_MULTIPROC") != "1":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    rc = run_isolated(argv, log, float(os.environ.get("ORACLE_ROW_S", "400")), env)
    rc = "timeout" if rc is None else rc
    text = log.read_text()
    if rc != 0 or not out.exists():
        print(f"[{name}] FAILED rc={rc}\n" + text[-4000:], flush=True)
        return {"ok": False, "log_tail": text[-3000:]}
    res = json.loads(out.read_text())
    res["ok"] = True
    res["wall_s"] = time.perf_counter() - t0
    res["methods"] = sorted(set(re.findall(r"vllm-mixed: (.+? via \w+)", text)))
    res["kernels"] = sorted(set(re.findall(r"(Using \w+(?: \w+)? (?:for|kernel|backend)[^\n]*)", text)))[:12]
    res["moe_backends"] = sorted(set(re.findall(r"Using '(\w+)' (?:WNA16|Fp8) MoE backend", text)))
    res["moe_choices"] = sorted(set(re.findall(r"\[moe backend ([^\]]+)\]", text)))
    print(f"[{name}] ok init {res['init_s']:.1f}s", flush=True)
    return res


def plugin_backend(format_name: str) -> str:
    """The MoE backend the plugin asks for this format's experts on this GPU
    (``kernel_choice``'s measured table), for the stock run it is compared with.
    Under ``VLLM_BATCH_INVARIANT`` vLLM refuses Humming and the plugin falls
    back to vLLM's own choice, so stock gets vLLM's own choice too."""
    import torch
    from vllm import envs

    from vllm_mixed.formats import get_format
    from vllm_mixed.vllm_compat import moe_backend_available

    if not torch.cuda.is_available() or envs.VLLM_BATCH_INVARIANT:
        return "auto"
    major, minor = torch.cuda.get_device_capability()
    name = get_format(format_name).moe_kernels.get(10 * major + minor)
    return name if name and moe_backend_available(name) else "auto"


def tiny_plans(work: Path, recipes: dict[str, tuple], arch: str | None = None) -> dict:
    """Write the tiny model (of ``arch``, default Qwen3-MoE) under ``work/tiny``
    and each recipe (name -> (default source, rules[, kernels])) over its
    three checkpoints; their plans."""
    import yaml

    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.tiny import make_tiny

    make_tiny(work / "tiny", arch=arch)
    src = {"bf16": str(work / "tiny/bf16"), "fp8": str(work / "tiny/fp8"), "int4": str(work / "tiny/gptq-int4")}
    plans = {}
    for name, (default, rules, *kernels) in recipes.items():
        path = work / f"{name}.yaml"
        body = {"sources": src, "base": "bf16", "default": default, "dtype": "bfloat16", "rules": rules}
        if kernels:
            body["kernels"] = kernels[0]
        path.write_text(yaml.safe_dump(body))
        plans[name] = build_plan(load_recipe(path))
    return plans


def vs_reference(plan, teacher: list) -> tuple[float, float]:
    """(top-1 agreement, worst |logprob gap|) of a row's teacher-forced
    logprobs against the float32 transformers reference on ``plan``'s weights."""
    from vllm_mixed.testing.reference import agreement

    return agreement(plan, TEACHER, teacher)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/vllm-mixed-oracle")
    ap.add_argument("--kernels", action="store_true",
                    help="the MoE-backend choice check instead: the plugin's per-format choice, a recipe override and "
                    "the user's --moe-backend, each against stock vLLM on the same backend")  # fmt: skip
    ap.add_argument("--tp", type=int, default=1, help="N > 1: the tensor-parallel check instead (mix at TP 1 vs N)")
    ap.add_argument("--ep", action="store_true", help="with --tp N: expert parallelism on every TP N engine")
    ap.add_argument("--tp-recipes", default="tp1,mix,mix-export,all-int4",
                    help="recipes run at TP N and their stock oracles; tp1: the mix at TP 1 too; mix-export: the "
                    "mix exported to compressed-tensors and served by stock vLLM")  # fmt: skip
    ap.add_argument("--arch", default=None, help="make-tiny --arch name (default: the tiny Qwen3-MoE)")
    ap.add_argument("--repeat-stock", action="store_true",
                    help="run each stock row twice: the kernels' run-to-run gap beside the plugin's gap to stock")  # fmt: skip
    ap.add_argument("--moe-backend", default=None,
                    help="every row, stock and plugin, with this --moe-backend (the user's flag, which the plugin "
                    "obeys), e.g. marlin beside the plugin's own choice")  # fmt: skip
    ap.add_argument("--variants", action="store_true", help="the AWQ / act-order / int8 GPTQ sources instead")
    ap.add_argument("--variant-recipes", default=",".join(VARIANT_RECIPES),
                    help="with --variants: the recipes run (and the stock rows they are compared with)")  # fmt: skip
    ap.add_argument("--recipes", default="all-bf16,all-fp8,all-int4,mix",
                    help="the default check's recipes (and so their stock rows): e.g. all-fp8,all-int4,mix where the "
                    "CPU build already compared bf16")  # fmt: skip
    args = ap.parse_args()
    from vllm_mixed.compose import compose
    from vllm_mixed.models import model_named
    from vllm_mixed.models.qwen3_moe import QWEN3_MOE

    if args.variants:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return variants_check(Path(args.out), Path(args.work), args.variant_recipes.split(","), args.arch)

    final, work = Path(args.out), Path(args.work)
    final.mkdir(parents=True, exist_ok=True)
    out_dir = work / "rows"  # per-row logs; packed into one file at the end
    out_dir.mkdir(parents=True, exist_ok=True)
    recipes = {
        "all-bf16": ("bf16", []),
        "all-fp8": ("fp8", []),
        "all-int4": ("int4", []),
        "mix": ("bf16", list((model_named(args.arch) if args.arch else QWEN3_MOE).tiny_rules)),
    }
    if args.kernels:
        recipes |= KERNEL_RECIPES
    elif args.tp == 1:
        recipes = {name: r for name, r in recipes.items() if name in args.recipes.split(",")}
    plans = tiny_plans(work, recipes, args.arch)
    composed = {name: compose(plan, work / name) for name, plan in plans.items()}

    if args.kernels:
        return kernel_check(work, composed, plans, out_dir, final)
    if args.tp > 1:
        return tp_check(args.tp, args.tp_recipes.split(","), work, composed, plans, out_dir, final, args.ep)
    stock_rows = {  # recipe -> (its stock row, directory, --moe-backend)
        "all-bf16": ("stock-bf16", "tiny/bf16", "auto"),
        "all-fp8": ("stock-fp8", "tiny/fp8", "auto"),
        # on the int4 MoE backend the plugin picks here (its measured table), so the kernels are the same
        "all-int4": ("stock-gptq", "tiny/gptq-int4", plugin_backend("gptq_int4")),
    }
    if args.moe_backend:
        stock_rows = {name: (row, directory, args.moe_backend) for name, (row, directory, _) in stock_rows.items()}
    results = {
        row: run(row, work / directory, "auto", out_dir, moe_backend=backend)
        for name, (row, directory, backend) in stock_rows.items()
        if name in recipes
    }
    for name in recipes:
        results[name] = run(name, composed[name], "mixed", out_dir, moe_backend=args.moe_backend or "auto")
    repeats = {}  # stock row -> its second run: the kernels' own run-to-run gap, beside the plugin's gap
    for name, (row, directory, backend) in stock_rows.items():
        if args.repeat_stock and name in recipes and results[row]["ok"]:
            gap = run_to_run(row, work / directory, out_dir, results[row], backend)
            if gap is not None:
                repeats[row] = gap

    oracle = {"all-bf16": "stock-bf16", "all-fp8": "stock-fp8", "all-int4": "stock-gptq"}
    rows = []
    for name in recipes:
        r = results[name]
        row = {"recipe": name, "ok": r["ok"]}
        if r["ok"]:
            row["top1_vs_fp32_ref"], row["worst_logprob_gap"] = vs_reference(plans[name], r["teacher"])
            row["methods"] = r["methods"]
            if name in oracle and oracle[name] in results and results[oracle[name]]["ok"]:
                row["same_greedy_as_stock"] = r["tokens"] == results[oracle[name]]["tokens"]
                row["max_logprob_gap_vs_stock"] = max_gap(r, results[oracle[name]])
                if oracle[name] in repeats:
                    row["stock_run_to_run"] = repeats[oracle[name]]
        rows.append(row)
    subprocess.run(["tar", "czf", str(final / "oracle-logs.tar.gz"), "-C", str(out_dir), "."], check=False)
    (final / "oracle.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "results": {k: {kk: vv for kk, vv in v.items() if kk != "teacher"} for k, v in results.items()},
            },
            indent=1,
        )
    )
    print("\nrecipe     same greedy as stock   top-1 vs fp32 ref   worst |dlogprob|   max |dlogprob| vs stock")
    for row in rows:
        if not row["ok"]:
            print(f"{row['recipe']:10s} FAILED")
            continue
        same = row.get("same_greedy_as_stock", "n/a (mix)")
        print(
            f"{row['recipe']:10s} {str(same):22s} {row['top1_vs_fp32_ref']:.3f}               {row['worst_logprob_gap']:.3f}"
            f"              {row.get('max_logprob_gap_vs_stock', '-')}"
        )
    for row in rows:
        if "stock_run_to_run" in row:
            print(f"  {row['recipe']}: stock's second run against its first: {row['stock_run_to_run']}")
        for m in row.get("methods", []):
            print(f"  {row['recipe']}: {m}")
    for name, r in results.items():
        if r["ok"]:
            print(f"  {name} kernels: {'; '.join(r['kernels'][:4])}")


KERNEL_RECIPES = {
    # the experts of layer 0 in FP8, of layer 1 in int4: each on its own backend in one engine
    "experts-fp8-int4": ("bf16", [{"targets": ["model.layers.0.mlp.experts"], "source": "fp8"},
                                  {"targets": ["model.layers.1.mlp.experts"], "source": "int4"}]),
    "all-int4-recipe-marlin": ("int4", [], {"int4": {"moe_backend": "marlin"}}),
}  # fmt: skip


def kernel_check(work: Path, composed: dict, plans: dict, out_dir: Path, final: Path) -> None:
    """The plugin's MoE-backend choice (``kernel_choice``): with no flag its
    int4 experts run on the format's measured backend (Humming on Hopper) and
    equal stock vLLM given that backend; a recipe's ``kernels`` override and
    the user's ``--moe-backend`` win and equal stock vLLM on theirs; in one
    engine, FP8 experts keep vLLM's own backend beside Humming int4 experts.
    Seven engine starts: about 6 minutes on a warm machine, 9 on a cold one."""
    gptq = work / "tiny/gptq-int4"
    rows_to_run = [  # (row, model, load format, --moe-backend)
        ("stock-gptq", gptq, "auto", "auto"),
        ("stock-gptq@humming", gptq, "auto", "humming"),
        ("all-int4", composed["all-int4"], "mixed", "auto"),
        ("all-int4@user-marlin", composed["all-int4"], "mixed", "marlin"),
        ("all-int4-recipe-marlin", composed["all-int4-recipe-marlin"], "mixed", "auto"),
        ("mix", composed["mix"], "mixed", "auto"),
        ("experts-fp8-int4", composed["experts-fp8-int4"], "mixed", "auto"),
    ]
    results = {}
    for name, model, load_format, backend in rows_to_run:
        results[name] = run(name.replace("@", "-"), model, load_format, out_dir, moe_backend=backend)
        # written after every row: a call that runs out of time still returns what it measured
        (final / "kernels-partial.json").write_text(json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "teacher"} for k, v in results.items()}, indent=1))  # fmt: skip
    pairs = {"all-int4": "stock-gptq@humming", "all-int4@user-marlin": "stock-gptq",
             "all-int4-recipe-marlin": "stock-gptq"}  # fmt: skip
    rows = []
    for name, r in results.items():
        row = {"row": name, "ok": r["ok"], "moe_backends": r.get("moe_backends"), "moe_choices": r.get("moe_choices")}
        if r["ok"] and name in pairs and results[pairs[name]]["ok"]:
            row["oracle"] = pairs[name]
            row["same_greedy_as_oracle"] = r["tokens"] == results[pairs[name]]["tokens"]
        if r["ok"] and not name.startswith("stock"):
            plan = plans[name.split("@")[0]]
            row["top1_vs_fp32_ref"], row["worst_logprob_gap"] = vs_reference(plan, r["teacher"])
        rows.append(row)
    (final / "kernels.json").write_text(json.dumps({"rows": rows, "results": {
        k: {kk: vv for kk, vv in v.items() if kk != "teacher"} for k, v in results.items()}}, indent=1))  # fmt: skip
    subprocess.run(["tar", "czf", str(final / "kernels-logs.tar.gz"), "-C", str(out_dir), "."], check=False)
    print(f"\n{'row':26s} {'vLLM MoE backends':22s} {'oracle':20s} same  top-1  worst")
    for r in rows:
        if not r["ok"]:
            print(f"{r['row']:26s} FAILED")
            continue
        print(f"{r['row']:26s} {','.join(r['moe_backends'] or []):22s} {r.get('oracle', '-'):20s} "
              f"{r.get('same_greedy_as_oracle', '-')!s:5s} {r.get('top1_vs_fp32_ref', 0):.3f}  "
              f"{r.get('worst_logprob_gap', 0):.3f}")  # fmt: skip
        for c in r.get("moe_choices") or []:
            print(f"    plugin: {c}")


def tp_check(
    tp: int, names: list[str], work: Path, composed: dict, plans: dict, out_dir: Path, final: Path, ep: bool = False
) -> None:
    """vLLM's own tensor parallelism: the mix at TP ``tp`` gives the same
    greedy tokens as at TP 1, and each pure recipe at TP ``tp`` the same as
    stock vLLM on its single checkpoint at TP ``tp``; with ``ep`` every TP
    ``tp`` engine, the plugin's and stock's, runs with expert parallelism."""
    from vllm_mixed.export import export

    stock = {n: work / d for n, d in {"all-bf16": "tiny/bf16", "all-fp8": "tiny/fp8", "all-int4": "tiny/gptq-int4"}.items()
             if n in names}  # fmt: skip
    if "mix-export" in names:  # the mix as one compressed-tensors checkpoint, served by stock vLLM: same weights
        stock["mix"] = export(plans["mix"], work / "mix-export", progress=False)
    results = {}
    if "tp1" in names:
        results["mix@tp1"] = run("mix-tp1", composed["mix"], "mixed", out_dir, 1)
    for name in [n for n in names if n in composed]:
        results[f"{name}@tp{tp}"] = run(f"{name}-tp{tp}", composed[name], "mixed", out_dir, tp, ep=ep)
        if name in stock:
            backend = plugin_backend("gptq_int4") if name in ("all-int4", "mix") else "auto"  # int4 experts
            results[f"stock-{name}@tp{tp}"] = run(f"stock-{name}-tp{tp}", stock[name], "auto", out_dir, tp, backend, ep)
    rows = []
    pairs = [("mix@tp1", f"mix@tp{tp}")] if "tp1" in names else []
    pairs += [(f"stock-{n}@tp{tp}", f"{n}@tp{tp}") for n in stock]
    for ref, got in pairs:
        a, b = results[ref], results[got]
        row = {"check": f"{got} vs {ref}", "ok": a["ok"] and b["ok"]}
        if row["ok"]:
            row["same_greedy"] = a["tokens"] == b["tokens"]
            row["tokens_equal"] = sum(x == y for ta, tb in zip(a["tokens"], b["tokens"]) for x, y in zip(ta, tb))
            row["tokens_total"] = sum(len(t) for t in a["tokens"])
            gaps = [abs(pa[k][0] - pb[k][0]) for sa, sb in zip(a["teacher"], b["teacher"])
                    for pa, pb in zip(sa, sb) for k in set(pa) & set(pb)]  # fmt: skip
            row["max_teacher_logprob_diff"] = max(gaps) if gaps else None
            row["top1_vs_fp32_ref"], _ = vs_reference(plans[got.split("@")[0]], b["teacher"])
            row["methods"] = b.get("methods", [])
        rows.append(row)
    (final / "tp.json").write_text(json.dumps({"tp": tp, "ep": ep, "rows": rows, "results": {
        k: {kk: vv for kk, vv in v.items() if kk != "teacher"} for k, v in results.items()}}, indent=1))  # fmt: skip
    subprocess.run(["tar", "czf", str(final / "tp-logs.tar.gz"), "-C", str(out_dir), "."], check=False)
    print(
        f"\ncheck (TP {tp})                         same greedy  tokens equal  max |dlogprob| TP1 vs TPn  top-1 vs fp32 ref"
    )
    for r in rows:
        if not r["ok"]:
            print(f"{r['check']:40s} FAILED")
            continue
        print(f"{r['check']:40s} {r['same_greedy']!s:11s}  {r['tokens_equal']}/{r['tokens_total']:<10}  "
              f"{r['max_teacher_logprob_diff']:.4f}                    {r['top1_vs_fp32_ref']:.3f}")  # fmt: skip


VARIANT_SOURCES = {"bf16": "bf16", "awq": "awq", "int4a": "gptq-int4-actorder", "int8": "gptq-int8"}
VARIANT_RECIPES = {
    "all-awq": ("awq", []),
    "all-int4-actorder": ("int4a", []),
    "all-int8": ("int8", []),
    "mix-variants": ("bf16", [
        {"targets": ["model.layers.*.mlp.experts"], "source": "awq"},
        {"targets": ["model.layers.*.self_attn.qkv_proj"], "source": "int4a"},
        {"targets": ["model.layers.*.self_attn.o_proj"], "source": "int8"},
    ]),
}  # fmt: skip


def max_gap(a: dict, b: dict) -> float:
    """Largest |logprob difference| over the tokens both rows returned."""
    gap = 0.0
    for seq_a, seq_b in zip(a["teacher"], b["teacher"], strict=True):
        for pa, pb in zip(seq_a, seq_b, strict=True):
            gap = max([gap, *(abs(pa[t][0] - pb[t][0]) for t in set(pa) & set(pb))])
    return gap


def run_to_run(name: str, model: Path, out_dir: Path, first: dict, moe_backend: str = "auto") -> dict | None:
    """Stock row ``name`` run a second time, against its first run ``first``:
    the kernels' own run-to-run gap (None when the second run failed)."""
    again = run(f"{name}-again", model, "auto", out_dir, moe_backend=moe_backend)
    if not again["ok"]:
        return None
    return {"same_greedy": again["tokens"] == first["tokens"], "max_logprob_gap": max_gap(again, first)}


def variants_check(final: Path, work: Path, names: list[str], arch: str | None = None) -> None:
    """Stock vLLM on the AWQ / act-order / int8 checkpoints of the tiny
    ``arch`` (default Qwen3-MoE) against the plugin's pure recipes of each,
    and the mix (its experts or MLP AWQ, q/k/v act-order, o_proj int8)
    against the reference (``names``: the recipes run; a pure one brings its
    stock row)."""
    import yaml

    from vllm_mixed.compose import compose
    from vllm_mixed.formats import UNQUANTIZED
    from vllm_mixed.formats.awq import AWQ
    from vllm_mixed.formats.gptq_int8 import GPTQ_INT8
    from vllm_mixed.formats.gptq_variants import act_order_tiny
    from vllm_mixed.models import model_named
    from vllm_mixed.models.qwen3_moe import QWEN3_MOE
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.tiny import make_tiny

    out_dir = work / "variant-rows"
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny = work / "tiny-variants"
    make_tiny(tiny, arch=arch, formats=(UNQUANTIZED, AWQ, act_order_tiny(), GPTQ_INT8))
    experts_or_mlp = list((model_named(arch) if arch else QWEN3_MOE).tiny_rules[0]["targets"])
    sources = {name: str(tiny / d) for name, d in VARIANT_SOURCES.items()}
    unknown = set(names) - set(VARIANT_RECIPES)
    if unknown:
        raise SystemExit(f"unknown --variant-recipes {sorted(unknown)}: of {sorted(VARIANT_RECIPES)}")
    recipes = {name: VARIANT_RECIPES[name] for name in names}
    results, rows = {}, []
    for name, directory in VARIANT_SOURCES.items():
        if any(default == name and not rules for default, rules in recipes.values()):
            results[f"stock-{name}"] = run(f"stock-{name}", tiny / directory, "auto", out_dir)
    for name, (default, rules) in recipes.items():
        rules = [dict(r, targets=experts_or_mlp) if r["source"] == "awq" else r for r in rules]
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"sources": sources, "base": "bf16", "default": default,
                                        "dtype": "bfloat16", "rules": rules}))  # fmt: skip
        plan = build_plan(load_recipe(path))
        r = results[name] = run(name, compose(plan, work / name), "mixed", out_dir)
        row = {"recipe": name, "ok": r["ok"]}
        if r["ok"]:
            row["top1_vs_fp32_ref"], row["worst_logprob_gap"] = vs_reference(plan, r["teacher"])
            row["methods"] = r["methods"]
            stock = results.get(f"stock-{default}") if not rules else None
            if stock is not None and stock["ok"]:
                row["same_greedy_as_stock"] = r["tokens"] == stock["tokens"]
                row["max_logprob_gap_vs_stock"] = max_gap(r, stock)
        rows.append(row)
    subprocess.run(["tar", "czf", str(final / "variants-logs.tar.gz"), "-C", str(out_dir), "."], check=False)
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "teacher"} for k, v in results.items()}
    (final / "variants.json").write_text(json.dumps({"rows": rows, "results": summary}, indent=1))
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "methods"}))
        for m in row.get("methods", []):
            print(f"  {row['recipe']}: {m}")
    for name, r in results.items():
        print(f"  {name}: {'ok' if r['ok'] else 'FAILED'}; {'; '.join(r.get('kernels', [])[:4])}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:8])
    else:
        main()
