#!/usr/bin/env python3
"""The kernel issue's regimes on the lent GPU, several per engine start.

``gpu_throughput.py`` starts one engine per (row, regime) through vLLM's
``bench`` commands; at the 30B shape the start (load, compile, CUDA graphs)
is most of a row's 95-230 s. Here one engine per row runs, in this order,
**batch 1** (32 in / 256 out, 2 warm-up + 5 timed, as ``vllm bench latency``),
**prefill-heavy** (256 x 1024 in / 256 out) and **decode-heavy** (256 x 128
in / 1024 out), each as ``vllm bench throughput`` measures it: one
``LLM.generate`` over random token prompts, ``ignore_eos``, sampled at
temperature 1, output tokens over its wall time. ``capped`` (512 x 2048 /
512 with vLLM given 48 GiB of the card) needs other engine flags, so it gets
an engine of its own. Models, engine flags and row names (``@humming``,
``@marlin``, ``@grouped``, ``@a8`` ...) are ``gpu_throughput.py``'s.

``--profile ROWS``: after the timings those rows run two profiled windows
with vLLM's own torch profiler (``profiler_config``): 48 decode steps at
batch 1, 32 prompts of 1024 tokens with 8 out (prefill), and 256 prompts of
16 tokens with 32 out (decode-heavy: mostly decode steps of 256 sequences,
about 16 tokens per expert). The top of
each kernel table (self CUDA time) goes into the row.

``--tp N`` / ``--ep``: every row at that layout (the multi-GPU issue), with
``vllm-mixed plan --tp N [--ep]``'s verdicts recorded beside the plugin's rows;
``VLLM_MIXED_BENCH_SHAPE=qwen3-235b-a22b`` for that model's shape.

Usage (device): python3 benchmarks/gpu_regimes.py --out $OUT --rows stock-fp8,mix-b --regimes batch1,prefill,decode
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_throughput as gt  # noqa: E402

from vllm_mixed.processes import run_isolated  # noqa: E402

# regime -> (prompts, input tokens, output tokens); batch1 is timed as vllm bench latency
REGIMES = {"batch1": (1, 32, 256), "prefill": (256, 1024, 256), "decode": (256, 128, 1024), "capped": (512, 2048, 512)}
PROFILE_TABLE_LINES = 28


def engine_kwargs(flags: list[str]) -> dict:
    """``gpu_throughput``'s engine flags (``--name value``) as ``LLM`` keyword arguments."""
    kwargs = {}
    for i in range(0, len(flags), 2):
        key, value = flags[i].lstrip("-").replace("-", "_"), flags[i + 1]
        kwargs[key] = value if not re.fullmatch(r"[\d.]+", value) else (float(value) if "." in value else int(value))
    return kwargs


def prompts(n: int, length: int, seed: int) -> list:
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    return [TokensPrompt(prompt_token_ids=[rng.randrange(10, gt.VOCAB - 10) for _ in range(length)]) for _ in range(n)]


def timed(llm, n: int, inp: int, out: int, seed: int) -> dict:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=out)
    ps = prompts(n, inp, seed)
    t0 = time.perf_counter()
    outs = llm.generate(ps, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": round(dt, 3), "output_tok_s": round(produced / dt, 1),
            "total_tok_s": round((produced + n * inp) / dt, 1), "output_tokens": produced}  # fmt: skip


def profile_window(llm, directory: Path, n: int, inp: int, out: int) -> list[str]:
    """One window of vLLM's torch profiler; the top of its self-CUDA-time table."""
    for f in directory.glob("*profiler_out*.txt"):  # vLLM 0.26: profiler_out_0.txt; later: <rank>.profiler_out.txt
        f.unlink()
    llm.start_profile()
    timed(llm, n, inp, out, 99)
    llm.stop_profile()
    tables = sorted(directory.glob("*profiler_out*.txt"))
    lines = tables[0].read_text().splitlines() if tables else ["(no profiler table written)"]
    for f in directory.glob("*.pt.trace.json*"):  # the full traces stay on the device
        f.unlink()
    return lines[:PROFILE_TABLE_LINES]


def child(model: str, spec: str, regimes: str, out: str, profile: str) -> None:
    from vllm import LLM

    regs = regimes.split(",")
    name, variant = gt.parse_row(spec)
    extra, _ = gt.VARIANTS[variant] if variant else ([], {})
    kwargs = engine_kwargs(gt.engine_flags("capped" if regs == ["capped"] else "throughput") + extra)
    kwargs["tensor_parallel_size"] = int(os.environ.get("VLLM_MIXED_BENCH_TP", "1"))
    kwargs["enable_expert_parallel"] = os.environ.get("VLLM_MIXED_BENCH_EP") == "1"
    if profile == "1":
        kwargs["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(Path(out).parent / "profile"),
                                     "torch_profiler_with_stack": False}  # fmt: skip
    t0 = time.perf_counter()
    llm = LLM(model=model, **kwargs)
    res: dict = {"init_s": round(time.perf_counter() - t0, 1)}

    def save() -> None:  # after every regime: a call that runs out of time keeps what it measured
        Path(out).write_text(json.dumps(res))

    for reg in regs:
        n, inp, outlen = REGIMES[reg]
        if reg == "batch1":
            for i in range(2):
                timed(llm, 1, inp, outlen, 100 + i)
            runs = [timed(llm, 1, inp, outlen, 200 + i)["elapsed_s"] for i in range(5)]
            res[reg] = {"avg_latency_s": round(sum(runs) / 5, 4), "ms_per_token": round(1000 * sum(runs) / 5 / outlen, 3),
                        "runs_s": runs}  # fmt: skip
        else:
            timed(llm, 16, inp, 16, 300)  # one short untimed pass at this prompt length first
            res[reg] = timed(llm, n, inp, outlen, 1)
        save()
    if profile == "1":
        pdir = Path(out).parent / "profile"
        res["profile_batch1"] = profile_window(llm, pdir, 1, 32, 48)
        res["profile_prefill"] = profile_window(llm, pdir, 32, 1024, 8)
        save()
        res["profile_decode"] = profile_window(llm, pdir, 256, 16, 32)
        save()
    llm.llm_engine.engine_core.shutdown()


def run_engine(spec: str, model: Path, regimes: list[str], out: Path, timeout: int, profile: bool) -> dict:
    _, variant = gt.parse_row(spec)
    _, env_extra = gt.VARIANTS[variant] if variant else ([], {})
    tag = re.sub(r"[^\w.-]", "_", spec) + ("-capped" if regimes == ["capped"] else "")
    log, js = out / f"regimes-{tag}.log", out / f"regimes-{tag}.json"
    env = {**os.environ, "VLLM_USE_DEEP_GEMM": "0", "VLLM_MIXED_BENCH_INT_FILL": "1", "VLLM_MIXED_BENCH_LOAD_PROBE": "1",
           **env_extra}  # fmt: skip
    argv = [sys.executable, __file__, "--child", str(model), spec, ",".join(regimes), str(js), "1" if profile else "0"]
    t0 = time.perf_counter()
    rc = run_isolated(argv, log, timeout, env)
    text = log.read_text(errors="replace")
    row = json.loads(js.read_text()) if js.exists() else {}
    row |= {"row": spec, "rc": "timeout" if rc is None else rc, "wall_s": round(time.perf_counter() - t0, 1)}
    row |= gt.log_facts(text)
    if row["rc"] != 0:
        row["tail"] = text[-3000:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="stock-fp8,mix-b")
    ap.add_argument("--regimes", default="batch1,prefill,decode", help=f"of {sorted(REGIMES)}; capped runs apart")
    ap.add_argument("--profile", default="", help="rows that also run the two profiled windows")
    ap.add_argument("--work", default="/tmp/vllm-mixed-bench")
    ap.add_argument("--budget-s", type=int, default=560, help="start no engine after this many seconds minus 90")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of every row")
    ap.add_argument("--ep", action="store_true", help="enable_expert_parallel for every row")
    args = ap.parse_args()
    os.environ["VLLM_MIXED_BENCH_TP"], os.environ["VLLM_MIXED_BENCH_EP"] = str(args.tp), "1" if args.ep else "0"
    start = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    specs, regimes = args.rows.split(","), args.regimes.split(",")
    for s in specs:
        gt.parse_row(s)
    unknown = set(regimes) - set(REGIMES)
    if unknown:
        raise SystemExit(f"unknown regimes {sorted(unknown)}: of {sorted(REGIMES)}")
    groups = [g for g in ([r for r in regimes if r != "capped"], ["capped"] if "capped" in regimes else []) if g]
    dirs, plans = gt.model_dirs(work)
    hbm = gt.hbm_copy_gbs() if "batch1" in regimes else None
    rows = []
    for group in groups:
        for spec in specs:
            left = args.budget_s - (time.perf_counter() - start)
            if left < 90:
                rows.append({"row": spec, "regimes": group, "rc": "skipped: call budget"})
                continue
            name, variant = gt.parse_row(spec)
            model = dirs[f"{name}-flat"] if variant == "wna16" else dirs[name]
            row = run_engine(spec, model, group, out, int(left), spec in args.profile.split(","))
            plan = plans[gt.PLAN_OF[name]]
            row["plan_gib"] = round(plan.total_bytes / 2**30, 2)
            row["layout"] = {"tp": args.tp, "ep": args.ep}
            if name.startswith("mix-") and (args.tp > 1 or args.ep):
                row["plan_verdicts"] = gt.plan_verdicts(work / f"{name}.yaml", args.tp, args.ep)
            if hbm and "batch1" in group:
                row["hbm_gbs"] = round(hbm, 1)
                row["floor_ms"] = round(1000 * gt.decode_bytes(plan, 32 + 128) / (hbm * 1e9), 3)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("tail",) and not k.startswith("profile")}),
                  flush=True)  # fmt: skip
            if "tail" in row:
                print(row["tail"], flush=True)
            (out / "regimes.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'row':22s}{'b1 ms/tok':>10}{'prefill':>9}{'decode':>9}{'capped':>9}{'conc':>7}{'GiB':>7}  init/wall s")
    for r in rows:
        b1 = (r.get("batch1") or {}).get("ms_per_token", "-")
        cols = [(r.get(k) or {}).get("output_tok_s", "-") for k in ("prefill", "decode", "capped")]
        print(f"{r['row']:22s}{b1!s:>10}{cols[0]!s:>9}{cols[1]!s:>9}{cols[2]!s:>9}{r.get('max_concurrency') or '-'!s:>7}"
              f"{r.get('weights_gib') or '-'!s:>7}  {r.get('init_s', '-')}/{r.get('wall_s', r['rc'])}")  # fmt: skip
    for r in rows:
        for key in ("profile_batch1", "profile_prefill", "profile_decode"):
            if r.get(key):
                print(f"\n{r['row']} {key}:\n" + "\n".join(r[key][:16]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
    else:
        main()
