#!/usr/bin/env python3
"""Load timing at Qwen3-30B-A3B's real width with fewer layers, on the lent GPU.

1. Writes random-valued checkpoints (all widths real, ``--layers`` decoder
   layers, so the three fit the device's disk) in the three published formats
   with the project's own quantizers, one shard per decoder layer
   (quantization runs on the GPU under ``torch.device('cuda')``).
2. Loads each in its own process, with the files evicted from the page cache
   first (``posix_fadvise(DONTNEED)``): stock vLLM 0.26 on the bf16, fp8 and
   gptq directories (``load_format='auto'``), and the plugin on mix A composed
   from the three (``load_format='mixed'``); then the fastest stock row and mix
   A again with the files cached.
3. Per row: vLLM's "Model loading took" seconds, the bytes of the checkpoint
   files resident in the page cache afterwards (= bytes read from disk,
   readahead included) against the bytes the row needs, and, from
   ``benchmarks/bench_hooks.py``'s probe, peak against resident GPU memory of
   the load (allocation, weights, ``process_weights_after_loading``).

Usage (device): python3 benchmarks/gpu_load.py --out $OUT --layers 8
On the CPU build (bytes read and load time only; stock FP8/GPTQ do not run there):
BENCH_DEVICE=cpu python benchmarks/gpu_load.py --out OUT --layers 2 --rows stock-bf16,mix-a,mix-a-warm
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_hooks import parse_load_probe  # noqa: E402

from vllm_mixed.processes import run_isolated  # noqa: E402
from vllm_mixed.testing.published import published_config  # noqa: E402

CONFIG = published_config("qwen3-30b-a3b")
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # where the quantizers run


# --- checkpoints ---------------------------------------------------------------------------------------------------


def write_checkpoints(root: Path, layers: int) -> dict[str, Path]:
    """The three checkpoints as ``make-tiny`` writes them (same weight init,
    encoding and config.json), at ``CONFIG``'s width, one shard per decoder
    layer so that no more than one layer is in memory."""
    import torch

    from vllm_mixed.checkpoint_writer import ShardWriter
    from vllm_mixed.formats import TINY_FORMATS
    from vllm_mixed.models import layers_for
    from vllm_mixed.tiny import checkpoint_config, encode_member, init_weight

    cfg = dict(CONFIG, num_hidden_layers=layers)
    groups: dict[str, list] = {}
    for layer in layers_for(cfg, "load benchmark config"):
        m = re.match(r"model\.layers\.(\d+)\.", layer.name)
        groups.setdefault(f"layer{int(m.group(1)):03d}" if m else "outer", []).append(layer)
    dirs = {}
    for fmt in TINY_FORMATS:
        out = root / fmt.tiny.directory
        dirs[fmt.tiny.directory] = out
        if (out / "model.safetensors.index.json").exists() and json.loads((out / "config.json").read_text()).get(
            "num_hidden_layers"
        ) == layers:
            continue  # written by an earlier run in this work directory
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(checkpoint_config(cfg, fmt), indent=2))
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        writer = ShardWriter(out, shard_bytes=2**62)  # one shard per group: flushed below
        for key in sorted(groups):
            with torch.device(DEVICE):  # the quantizers' own tensors land there too
                for layer in groups[key]:
                    for m in layer.members:
                        for k, v in encode_member(layer, init_weight(layer.kind, m.shape, gen), fmt).items():
                            writer.add(f"{m.name}.{k}", v.cpu())
            writer.flush()
        writer.finish()
    return dirs


# --- page cache ----------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore on a read-only mapping)."""
    size = path.stat().st_size
    if not size:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        try:
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            _libc.munmap(addr, size)
        return sum(1 for v in vec if v & 1) * PAGE
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pgpgin_bytes() -> int:
    """Bytes the kernel has read from block devices since boot (/proc/vmstat
    pgpgin, in KiB): the machine-wide upper bound of a row's reads, unlike
    the page-cache count, which loses pages evicted during the load."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("pgpgin "):
            return int(line.split()[1]) * 1024
    return 0


def shards(dirs: list[Path]) -> list[Path]:
    return sorted(p for d in dirs for p in d.glob("*.safetensors"))


# --- rows ----------------------------------------------------------------------------------------------------------


def child(model: str, load_format: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=model, load_format=load_format, dtype="bfloat16", enforce_eager=True, max_model_len=512,
              max_num_seqs=4, gpu_memory_utilization=0.5, seed=0, skip_tokenizer_init=True,
              attention_backend="TRITON_ATTN")  # fmt: skip
    init = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    tokens = list(
        llm.generate([TokensPrompt(prompt_token_ids=[11, 22, 33, 44])], sp, use_tqdm=False)[0].outputs[0].token_ids
    )
    Path(out).write_text(json.dumps({"engine_init_s": init, "tokens": tokens}))
    llm.llm_engine.engine_core.shutdown()
    os._exit(0)


def run_row(name: str, model: Path, load_format: str, files: list[Path], cold: bool, needed: int, out: Path) -> dict:
    if cold:
        for f in files:
            evict(f)
    before = sum(resident_bytes(f) for f in files)
    disk0 = pgpgin_bytes()
    res, log = out / f"load-{name}.json", out / f"load-{name}.log"
    env = {**os.environ, "VLLM_MIXED_BENCH_LOAD_PROBE": "1", "VLLM_USE_DEEP_GEMM": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    t0 = time.perf_counter()
    rc = run_isolated([sys.executable, __file__, "--child", str(model), load_format, str(res)], log, 240, env)
    rc = "timeout" if rc is None else rc
    after = sum(resident_bytes(f) for f in files)
    disk = pgpgin_bytes() - disk0
    text = log.read_text(errors="replace")
    row: dict = {
        "row": name,
        "cache": "cold" if cold else "warm",
        "rc": rc,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    m = re.search(r"Model loading took ([\d.]+) GiB memory and ([\d.]+) seconds", text)
    if m:
        row["weights_gib"], row["model_loading_s"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"Loading weights took ([\d.]+) seconds", text)
    row["stock_weights_s"] = float(m.group(1)) if m else None
    m = re.search(r"vllm-mixed: loaded \d+ tensors, ([\d.]+) MiB from \d+ files in ([\d.]+) s", text)
    row["mixed_stream_s"] = float(m.group(2)) if m else None
    probe = parse_load_probe(text)
    if probe:
        row["loader"], row["load_model_s"] = probe["loader"], probe["seconds"]
        row["peak_gib"], row["resident_gib"] = probe["peak_gib"], probe["resident_gib"]
    row["page_cache_before_gib"] = round(before / 2**30, 3)
    row["read_gib"] = round((after - before) / 2**30, 3) if cold else None  # checkpoint pages now cached
    row["disk_read_gib"] = round(disk / 2**30, 3)  # everything read from disk meanwhile (upper bound)
    row["needed_gib"] = round(needed / 2**30, 3)
    if res.exists():
        row.update(json.loads(res.read_text()))
    if rc != 0:
        row["tail"] = text[-3000:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--work", default="/tmp/vllm-mixed-load")
    ap.add_argument("--rows", default="stock-bf16,stock-fp8,stock-gptq,mix-a,stock-gptq-warm,mix-a-warm")
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--budget-s", type=int, default=560, help="start no row after this many seconds minus 90")
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    import yaml

    from vllm_mixed.compose import compose
    from vllm_mixed.plan import build_plan, pure_plan
    from vllm_mixed.recipe import load_recipe

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = write_checkpoints(work, args.layers)
    write_s = time.perf_counter() - t0
    recipe = work / "mix-a.yaml"
    recipe.write_text(yaml.safe_dump({
        "sources": {"bf16": str(dirs["bf16"]), "fp8": str(dirs["fp8"]), "int4": str(dirs["gptq-int4"])},
        "base": "bf16", "default": "bf16", "dtype": "bfloat16",
        "rules": [{"targets": ["model.layers.*.mlp.experts"], "source": "int4"}],
    }))  # fmt: skip
    plan = build_plan(load_recipe(recipe))
    mix = compose(plan, work / "mix-a")
    needed = {"mix-a": plan.total_bytes}
    for src, d in (("bf16", "bf16"), ("fp8", "fp8"), ("int4", "gptq-int4")):
        needed[d] = pure_plan(plan.recipe, plan.sources, src).total_bytes
    files = shards(list(dirs.values()))
    sizes = {d: sum(p.stat().st_size for p in dirs[d].glob("*.safetensors")) for d in dirs}
    print(json.dumps({"write_s": round(write_s, 1), "file_gib": {k: round(v / 2**30, 2) for k, v in sizes.items()},
                      "mix_a_needed_gib": round(needed["mix-a"] / 2**30, 3)}), flush=True)  # fmt: skip
    rows = []
    plan_rows = [("stock-bf16", dirs["bf16"], "auto", needed["bf16"], True),
                 ("stock-fp8", dirs["fp8"], "auto", needed["fp8"], True),
                 ("stock-gptq", dirs["gptq-int4"], "auto", needed["gptq-int4"], True),
                 ("mix-a", mix, "mixed", needed["mix-a"], True),
                 ("stock-gptq-warm", dirs["gptq-int4"], "auto", needed["gptq-int4"], False),
                 ("mix-a-warm", mix, "mixed", needed["mix-a"], False)]  # fmt: skip
    wanted = args.rows.split(",")
    for name, model, fmt, need, cold in [r for r in plan_rows if r[0] in wanted]:
        if args.budget_s - (time.perf_counter() - t0) < 90:
            rows.append({"row": name, "cache": "cold" if cold else "warm", "rc": "skipped: call budget",
                         "needed_gib": round(need / 2**30, 3)})  # fmt: skip
            continue
        row = run_row(name, model, fmt, files, cold, need, out)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tail"}), flush=True)
        if "tail" in row:
            print(row["tail"], flush=True)
        (out / "load.json").write_text(json.dumps(rows, indent=1))
    print(
        f"\n{'row':16s}{'cache':>6}{'loading s':>10}{'stream s':>9}{'read GiB':>9}{'needed':>8}{'peak':>8}{'resident':>9}"
    )
    for r in rows:
        print(f"{r['row']:16s}{r['cache']:>6}{r.get('model_loading_s', '-')!s:>10}{r.get('mixed_stream_s') or '-'!s:>9}"
              f"{r.get('read_gib') or '-'!s:>9}{r.get('disk_read_gib', '-')!s:>9}{r['needed_gib']:>8}{r.get('peak_gib', '-')!s:>8}{r.get('resident_gib', '-')!s:>9}")  # fmt: skip


if __name__ == "__main__":
    main()
