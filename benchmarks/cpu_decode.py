"""Decode speed and weight memory on vLLM's CPU build at Qwen3-30B-A3B width.

    PYTHONPATH=$PWD python benchmarks/cpu_decode.py --work /tmp/cpu-decode --layers 4 --out results/cpu-decode.json

Writes two random-valued checkpoints of Qwen3-30B-A3B's width (hidden 2048,
128 experts of 768, 32 q / 4 kv heads of 128, vocab 151936) with ``--layers``
decoder layers, through the project's own writers (``ShardWriter``,
``Format.quantize``): BF16, and GPTQ-Int4 g128 laid out as published (int4
attention and experts, fp16 router, norms, embeddings and head). Then, each
row in a fresh process (``processes.run_isolated``), one vLLM engine
(in-process, eager, bf16) and:

* batch-1 and batch-8 decode tokens/s: ``generate`` of 1 + N greedy tokens
  minus ``generate`` of 1 token (prefill), same prompts;
* weight memory: growth of the process's anonymous RSS and of the C heap over
  vLLM's ``load_model`` (model built, weights loaded and processed), and the
  bytes the model holds afterwards (``vllm_mixed.resident.held_bytes``).

Rows: stock BF16 (vLLM's own loader on the BF16 checkpoint), stock GPTQ-Int4
(the same on the GPTQ checkpoint), mix A (experts from the GPTQ checkpoint,
the rest BF16, through the plugin: vLLM's own method wherever its CPU build
has a kernel) and mix A with ``VLLM_MIXED_CPU_FALLBACK=1``. The plan's bytes
give the prediction: decode bytes per token (every layer but the embedding;
experts by the share a batch touches) and the CPU-resident bytes
(``cpu_kernels.cpu_resident_bytes``).

GPTQ quantization in the project's float64 writer takes ~0.4 s per expert
matrix here, so the experts are ``POOL`` distinct random float matrices per
shape, written as BF16 and quantized once to GPTQ, repeated over the 128
experts (the two checkpoints are one model, up to quantization); every expert
still has its own tensors in the file and in memory, so the bytes read per
token are those of the real layout. Decode timings are the best of
``REPEATS`` (the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vllm_mixed.checkpoint_writer import ShardWriter  # noqa: E402
from vllm_mixed.formats import UNQUANTIZED, get_format  # noqa: E402
from vllm_mixed.models import layers_for  # noqa: E402
from vllm_mixed.testing.published import published_config  # noqa: E402
from vllm_mixed.tiny import checkpoint_config, init_weight  # noqa: E402

POOL = 8  # distinct GPTQ expert matrices per shape
DECODE_TOKENS = 24
PROMPT_LEN = 16
BATCHES = (1, 8)
ROW_TIMEOUT_S = 420
REPEATS = 3


def model_config(layers: int) -> dict:
    cfg = dict(published_config("qwen3-30b-a3b"), num_hidden_layers=layers, max_window_layers=layers)
    cfg["max_position_embeddings"] = 4096
    return cfg


def write_checkpoints(work: Path, cfg: dict) -> dict[str, Path]:
    """BF16 and GPTQ-Int4 checkpoints of one random model (a marker file
    says they are complete; rerunning reuses them)."""
    gptq, dirs = get_format("gptq_int4"), {"bf16": work / "bf16", "int4": work / "gptq-int4"}
    marker = work / "written.json"
    if marker.exists() and json.loads(marker.read_text()) == cfg:
        return dirs
    gen = torch.Generator().manual_seed(0)
    pools: dict[tuple[int, ...], list[dict[str, torch.Tensor]]] = {}
    writers = {name: ShardWriter(d, 2**30) for name, d in dirs.items()}
    for name, fmt in (("bf16", UNQUANTIZED), ("int4", gptq)):
        (dirs[name] / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (dirs[name] / "config.json").write_text(json.dumps(checkpoint_config(cfg, fmt), indent=2))
    t0 = time.perf_counter()
    for layer in layers_for(cfg, "benchmark config"):
        for i, m in enumerate(layer.members):
            if layer.kind == "experts":  # POOL float masters per shape, repeated over the experts
                pool = pools.setdefault(m.shape, [])
                if len(pool) < POOL:
                    w = init_weight(layer.kind, m.shape, gen)
                    pool.append({"float": w, **gptq.quantize(w, gptq.tiny.quant_config)})
                entry = pool[i % len(pool)]
                writers["bf16"].add(f"{m.name}.weight", entry["float"].to(torch.bfloat16))
                for suffix, t in entry.items():
                    if suffix != "float":
                        writers["int4"].add(f"{m.name}.{suffix}", t.clone())
                continue
            w = init_weight(layer.kind, m.shape, gen)
            writers["bf16"].add(f"{m.name}.weight", w.to(torch.bfloat16))
            if layer.quantizable:
                for suffix, t in gptq.quantize(w, gptq.tiny.quant_config).items():
                    writers["int4"].add(f"{m.name}.{suffix}", t)
            else:
                writers["int4"].add(f"{m.name}.weight", w.to(torch.float16))
        print(f"  wrote {layer.name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for w in writers.values():
        w.finish()
    from vllm_mixed.tiny import write_tokenizer

    for d in dirs.values():  # the tiny model's tokenizer: prompts are token ids, outputs are not detokenized
        write_tokenizer(d)
    marker.write_text(json.dumps(cfg))
    return dirs


def recipes(work: Path, dirs: dict[str, Path], cfg: dict) -> dict[str, Path]:
    import yaml

    out = {}
    base = {"sources": {k: str(v) for k, v in dirs.items()}, "base": "bf16", "dtype": "bfloat16"}
    for name, body in {
        "bf16": {"default": "bf16", "rules": []},
        "int4": {"default": "int4", "rules": []},
        "mixA": {"default": "bf16", "rules": [{"targets": ["model.layers.*.mlp.experts"], "source": "int4"}]},
    }.items():
        out[name] = work / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump({**base, **body}, sort_keys=False))
    return out


def decode_bytes(plan, cfg: dict, batch: int, resident: bool = False) -> float:
    """Bytes read per decode step at ``batch`` from the plan's layers: all
    but the embedding; experts by the expected share of them a batch of
    ``batch`` tokens routes to (``resident``: in what the CPU holds)."""
    from math import prod

    e, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    share = 1 - (1 - k / e) ** batch
    total = 0.0
    for p in plan.layers:
        if p.layer.kind == "embedding":
            continue
        nbytes = p.nbytes
        if resident:
            from vllm_mixed.cpu_kernels import cpu_fallback_reason

            native = (
                p.fmt.quantized
                and cpu_fallback_reason(p.format, p.layer.kind, plan.sources[p.source].quant_config) is None
            )
            nbytes = nbytes if native else 2 * sum(prod(m.shape) for m in p.layer.members)
        total += nbytes * (share if p.layer.kind == "experts" else 1)
    return total


# --- one row, in its own process ---------------------------------------------------------------------------------


def run_row(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its RSS is this process's
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from vllm_mixed import resident

    measured: dict = {}
    original = BaseModelLoader.load_model

    def load_model(self, vllm_config, model_config, prefix=""):
        if measured:  # the plugin's loader calls this one through super()
            return original(self, vllm_config, model_config, prefix)
        measured["loader"] = type(self).__name__
        before = resident.snapshot()
        t0 = time.perf_counter()
        model = original(self, vllm_config, model_config, prefix)
        measured["load_s"] = time.perf_counter() - t0
        report = resident.measure(model, before, 2, 0).to_dict()
        report.pop("predicted")  # the driver has the plan's prediction
        measured.update(report)
        return model

    BaseModelLoader.load_model = load_model
    out: dict = {"row": spec["name"]}
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], load_format=spec["load_format"], dtype="bfloat16", max_model_len=512,
              enforce_eager=True, max_num_seqs=8, seed=0, gpu_memory_utilization=0.3)  # fmt: skip
    out["init_s"] = time.perf_counter() - t0
    out.update(measured)
    gen = torch.Generator().manual_seed(1)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 900, (PROMPT_LEN,), generator=gen).tolist())
               for _ in range(max(BATCHES))]  # fmt: skip
    llm.generate(
        prompts[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False), use_tqdm=False
    )
    for b in BATCHES:
        times = {}
        for n in (1, 1 + DECODE_TOKENS):
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
            best = float("inf")
            for _ in range(spec.get("repeats", REPEATS)):
                t = time.perf_counter()
                res = llm.generate(prompts[:b], params, use_tqdm=False)
                best = min(best, time.perf_counter() - t)
                assert all(len(r.outputs[0].token_ids) == n for r in res)
            times[n] = best
        out[f"decode_tok_s_b{b}"] = b * DECODE_TOKENS / (times[1 + DECODE_TOKENS] - times[1])
        out[f"prefill_s_b{b}"] = times[1]
    status = Path("/proc/self/status").read_text()
    out["vm_hwm"] = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
    out["rss_end"] = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) * 1024
    return out


# --- the driver --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cpu-decode"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", default="stock-bf16,stock-gptq-int4,mixA-native,mixA-fallback")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="decode timings: the best of this many")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row spec (JSON) and write its result
    args = ap.parse_args()
    if args.row:
        spec = json.loads(args.row)
        Path(spec["result"]).write_text(json.dumps(run_row(spec)))
        sys.stdout.flush()
        os._exit(0)

    from vllm_mixed.compose import compose
    from vllm_mixed.cpu_kernels import FALLBACK_ENV, cpu_resident_bytes
    from vllm_mixed.plan import build_plan
    from vllm_mixed.processes import run_isolated
    from vllm_mixed.recipe import load_recipe
    from vllm_mixed.resident import ResidentReport

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args.layers)
    t0 = time.perf_counter()
    dirs = write_checkpoints(work, cfg)
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s", flush=True)
    paths = recipes(work, dirs, cfg)
    plans = {name: build_plan(load_recipe(p)) for name, p in paths.items()}
    rows_spec = {
        "stock-bf16": ("bf16", str(dirs["bf16"]), "auto", {}),
        "stock-gptq-int4": ("int4", str(dirs["int4"]), "auto", {}),
        "mixA-native": ("mixA", None, "mixed", {}),
        "mixA-fallback": ("mixA", None, "mixed", {FALLBACK_ENV: "1"}),
    }
    results = []
    for name in args.rows.split(","):
        plan_name, model, load_format, extra_env = rows_spec[name]
        plan = plans[plan_name]
        if model is None:
            model = str(compose(plan, work / f"composed-{name}"))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop(FALLBACK_ENV, None)
        env.update(extra_env)
        with _environ(extra_env):  # the plan's CPU prediction for the row's own setting
            predicted = cpu_resident_bytes(plan)
            resident_decode = decode_bytes(plan, cfg, 1, resident=True)
        result_path, log = work / f"{name}.result.json", work / f"{name}.log"
        result_path.unlink(missing_ok=True)
        spec = {"name": name, "model": model, "load_format": load_format, "result": str(result_path),
                "repeats": args.repeats}  # fmt: skip
        print(f"row {name} ...", flush=True)
        t, load_before = time.perf_counter(), os.getloadavg()
        rc = run_isolated([sys.executable, __file__, "--row", json.dumps(spec)], log, ROW_TIMEOUT_S, env)
        row = {
            "row": name,
            "load_avg_before": load_before,
            "rc": rc,
            "wall_s": round(time.perf_counter() - t, 1),
            "log": str(log),
        }
        text = log.read_text(errors="replace")
        if result_path.exists():
            row.update(json.loads(result_path.read_text()))
        else:
            errors = [line for line in text.splitlines() if "Error" in line or "error" in line]
            row["error"] = errors[-1][-400:] if errors else text[-400:]
        plugin = ResidentReport.parse(text)
        row["plugin_report"] = plugin.to_dict() if plugin else None
        row["methods"] = sorted({line.split("vllm-mixed: ", 1)[1].split(" (dequantized")[0] for line in text.splitlines()
                                 if " <- source " in line})  # fmt: skip
        row["native_kernel_lines"] = sorted({line.split("] ", 1)[-1][:160] for line in text.splitlines()
                                             if "Using " in line and ("Kernel" in line or "backend" in line)})  # fmt: skip
        row.update(plan_bytes=plan.total_bytes, predicted_resident=predicted,
                   decode_bytes_b1=decode_bytes(plan, cfg, 1), decode_bytes_b8=decode_bytes(plan, cfg, 8),
                   resident_decode_bytes_b1=resident_decode)  # fmt: skip
        results.append(row)
        print(f"row {name}: " + json.dumps({k: v for k, v in row.items() if k not in ("methods", "native_kernel_lines")}),
              flush=True)  # fmt: skip
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    import importlib.metadata as md

    report = {
        "command": " ".join(sys.argv), "cpu": cpu, "cores": os.cpu_count(), "amx": " amx_tile" in flags,
        "avx512": " avx512f" in flags, "vllm": md.version("vllm-cpu") if _has("vllm-cpu") else "?",
        "torch": torch.__version__, "python": platform.python_version(), "layers": args.layers,
        "decode_tokens": DECODE_TOKENS, "prompt_len": PROMPT_LEN, "repeats": args.repeats, "rows": results,
        "load_avg_after": os.getloadavg(),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    from vllm_mixed.cpu_kernels import FALLBACK_ENV

    old = {k: os.environ.get(k) for k in (*values, FALLBACK_ENV)}
    os.environ.pop(FALLBACK_ENV, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _has(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
    except md.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
