#!/usr/bin/env python3
"""Compare the parameters and buffers of two engines after loading (after
``process_weights_after_loading``): which tensors differ, by how much.
Diagnoses a plugin-vs-stock logprob gap: weights, or what runs on them.

Usage (device): python3 benchmarks/gpu_param_diff.py OUT.json MODEL_A:LOAD_FORMAT[:MOE] MODEL_B:LOAD_FORMAT[:MOE]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def child(model: str, load_format: str, moe: str, out: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM

    llm = LLM(model=model, load_format=load_format, dtype="bfloat16", enforce_eager=True, max_model_len=512,
              gpu_memory_utilization=0.08, max_num_seqs=8, seed=0, skip_tokenizer_init=True,
              attention_backend="TRITON_ATTN", moe_backend=moe)  # fmt: skip

    def digest(model):
        rows = {}
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            x = t.detach()
            flat = x.reshape(-1).contiguous()
            raw = flat.view(torch.uint8) if x.dtype != torch.bool else flat.to(torch.uint8)
            rows[name.replace(".routed_experts.", ".")] = {
                "shape": list(x.shape), "dtype": str(x.dtype),
                "sum": float(x.double().sum()) if x.is_floating_point() else int(x.long().sum()),
                "bytes_hash": int((raw.long() * torch.arange(1, raw.numel() + 1, device=raw.device) % 1000003).sum()),
            }  # fmt: skip
        return rows

    res = llm.apply_model(digest)[0]
    with open(out, "w") as f:
        json.dump(res, f)
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    out, specs = sys.argv[1], sys.argv[2:4]
    digests = []
    for i, spec in enumerate(specs):
        model, fmt, *moe = spec.split(":")
        path = f"{out}.{i}.json"
        subprocess.run([sys.executable, __file__, "--child", model, fmt, moe[0] if moe else "auto", path], check=True,
                       stdout=subprocess.DEVNULL, stderr=open(f"{out}.{i}.log", "w"), timeout=280)  # fmt: skip
        digests.append(json.load(open(path)))
    a, b = digests
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = [n for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    print(f"{len(a)} / {len(b)} tensors; only in A: {only_a[:12]}; only in B: {only_b[:12]}")
    print(f"{len(differ)} differ:")
    for n in differ[:40]:
        print(f"  {n}: A {a[n]}  B {b[n]}")
    json.dump(
        {"only_a": only_a, "only_b": only_b, "differ": {n: [a[n], b[n]] for n in differ}}, open(out, "w"), indent=1
    )
