#!/usr/bin/env python3
"""Online serving on the lent GPU(s): vLLM's OpenAI server per row and
``vllm bench serve`` against it at several concurrencies (the kernel issue's
64 and 256; the multi-GPU issue's TP x DP layouts, which vLLM's offline
``LLM`` does not run).

Rows, models and engine flags are ``gpu_throughput.py``'s (``stock-fp8``,
``mix-b``, ``@humming`` ...; dummy weights with filled integers, Triton
attention, CUDA graphs, DeepGEMM off). Each row starts
``python -m vllm.entrypoints.openai.api_server`` with ``--tensor-parallel-size``
/ ``--data-parallel-size`` / ``--enable-expert-parallel`` as asked, waits for
``/health``, then runs vLLM's serving benchmark (random prompts, ``--ignore-eos``)
once per concurrency, and records TTFT, TPOT, throughput and failed requests
(``$OUT/serve.json``; the server and client logs in ``$OUT/serve-logs.tgz``).
For the plugin's rows it also records ``vllm-mixed plan --tp N [--ep]``'s
verdicts next to what vLLM built (its log), for the multi-GPU issue.

Usage (device): python3 benchmarks/gpu_serve.py --out $OUT --rows stock-fp8,mix-b --concurrency 64,256
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_throughput as gt  # noqa: E402

from vllm_mixed.processes import run_isolated  # noqa: E402

# vLLM's serving benchmark as a library call: the `vllm` console script needs vLLM's dist metadata,
# which the CPU build's install lacks; the module is the same in 0.26 and 0.32
CLIENT = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
p = FlexibleArgumentParser(); add_cli_args(p)
result = main(p.parse_args(sys.argv[2:]))
keep = {k: v for k, v in result.items() if not isinstance(v, list)}
keep["errors"] = sorted({e for e in result.get("errors", []) if e})[:5]
json.dump(keep, open(sys.argv[1], "w"))
"""
KEYS = ("completed", "failed", "duration", "output_throughput", "total_token_throughput", "request_throughput",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms")  # fmt: skip


def layout_flags(tp: int, dp: int, ep: bool) -> list[str]:
    flags = ["--tensor-parallel-size", str(tp)]
    if dp > 1:
        flags += ["--data-parallel-size", str(dp)]
    if ep:
        flags.append("--enable-expert-parallel")
    return flags


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(2)
    return False


def serve_row(
    spec: str, model: Path, args: argparse.Namespace, out: Path, logs: Path, deadline: float, port: int
) -> dict:
    _, variant = gt.parse_row(spec)
    extra, env_extra = gt.VARIANTS[variant] if variant else ([], {})
    tag = re.sub(r"[^\w.-]", "_", spec)
    log = logs / f"serve-{tag}.log"
    env = {**os.environ, "VLLM_USE_DEEP_GEMM": "0", "VLLM_MIXED_BENCH_INT_FILL": "1", **env_extra}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           *gt.engine_flags("throughput"), *extra, *layout_flags(args.tp, args.dp, args.ep),
           "--port", str(port)]  # fmt: skip
    row: dict = {"row": spec, "layout": {"tp": args.tp, "dp": args.dp, "ep": args.ep}}
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                  start_new_session=True)  # fmt: skip
    try:
        if not wait_healthy(port, server, max(10.0, deadline - time.monotonic() - 30)):
            row["rc"] = "server did not become healthy"
            return row
        row["ready_s"] = round(time.perf_counter() - t0, 1)
        for conc in args.concurrency:
            if deadline - time.monotonic() < 30:
                row[f"c{conc}"] = "skipped: call budget"
                continue
            res = logs / f"serve-{tag}-c{conc}.json"
            client = [sys.executable, "-c", CLIENT, str(res), "--backend", "vllm", "--base-url",
                      f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions", "--model", str(model),
                      "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", str(args.input_len),
                      "--random-output-len", str(args.output_len), "--num-prompts", str(args.prompts_per_level * conc),
                      "--max-concurrency", str(conc), "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl",
                      "--seed", "0"]  # fmt: skip
            rc = run_isolated(client, logs / f"serve-{tag}-c{conc}.client.log", deadline - time.monotonic())
            got = json.loads(res.read_text()) if res.exists() else {}
            row[f"c{conc}"] = {k: got.get(k) for k in KEYS} | {"rc": "timeout" if rc is None else rc,
                                                               "errors": got.get("errors")}  # fmt: skip
            (out / "serve.partial.json").write_text(json.dumps(row, indent=1))
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    text = log.read_text(errors="replace")
    row |= gt.log_facts(text)  # weights_gib: per rank
    row["rc"] = row.get("rc", 0)
    if any(not isinstance(row.get(f"c{c}"), dict) or row[f"c{c}"].get("failed") for c in args.concurrency):
        row["tail"] = text[-2500:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="stock-fp8,mix-b")
    ap.add_argument("--concurrency", default="64,256", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompts-per-level", type=int, default=2, help="requests per level: this times its concurrency")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--ep", action="store_true", help="--enable-expert-parallel")
    ap.add_argument("--work", default="/tmp/vllm-mixed-bench")
    ap.add_argument("--budget-s", type=int, default=540, help="start nothing past this many seconds")
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget_s
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    specs = args.rows.split(",")
    for s in specs:
        gt.parse_row(s)
    dirs, _ = gt.model_dirs(work)
    # the device returns at most 8 files: server and client logs go into one archive, serve.json beside it
    logs = work / "serve-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    rows = []
    for i, spec in enumerate(specs):
        if deadline - time.monotonic() < 120:
            rows.append({"row": spec, "rc": "skipped: call budget"})
            continue
        name, variant = gt.parse_row(spec)
        row = serve_row(spec, dirs[name], args, out, logs, deadline, 8100 + i)
        if name.startswith("mix-"):
            row["plan_verdicts"] = gt.plan_verdicts(work / f"{name}.yaml", args.tp, args.ep)
        rows.append(row)
        (out / "serve.json").write_text(json.dumps(rows, indent=1))
        with tarfile.open(out / "serve-logs.tgz", "w:gz") as tar:
            tar.add(logs, arcname="serve-logs")
    layout = f"TP {args.tp}" + (f" x DP {args.dp}" if args.dp > 1 else "") + (" EP" if args.ep else "")
    print(f"\n{layout}: {args.input_len} in / {args.output_len} out")
    print(f"{'row':20s}{'conc':>6}{'out tok/s':>11}{'TTFT ms (med)':>15}{'TPOT ms (med)':>15}{'failed':>8}")
    for r in rows:
        for c in args.concurrency:
            m = r.get(f"c{c}")
            if not isinstance(m, dict):
                print(f"{r['row']:20s}{c:>6}  {m or r.get('rc')}")
                continue
            print(f"{r['row']:20s}{c:>6}{m['output_throughput'] or 0:>11.1f}{m['median_ttft_ms'] or 0:>15.1f}"
                  f"{m['median_tpot_ms'] or 0:>15.2f}{m['failed'] if m['failed'] is not None else '-'!s:>8}")  # fmt: skip


if __name__ == "__main__":
    main()
