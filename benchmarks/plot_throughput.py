#!/usr/bin/env python3
"""Weight memory (as vLLM reports it) against output tok/s for the five
full-shape rows of a ``gpu_throughput.py`` results file, drawn with the same
plotter as ``vllm-mixed bench``. A row measured more than once is plotted at
its mean.

Usage: python benchmarks/plot_throughput.py benchmarks/results/throughput-h100-2026-11-26.json OUT.png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = {
    "stock-bf16": "stock BF16",
    "stock-fp8": "stock FP8 block",
    "stock-gptq": "stock GPTQ-Int4",
    "mix-a": "mix A (plugin)",
    "mix-b": "mix B (plugin)",
}


def main(results: str, png: str) -> None:
    from vllm_mixed.plot import write_plot

    seen: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in json.loads(Path(results).read_text()):
        name = r["row"].split("#")[0]
        if name in LABELS and r.get("output_tok_s") and r.get("weights_gib"):
            seen[name].append((r["weights_gib"], r["output_tok_s"]))
    points = [(LABELS[n], sum(w for w, _ in v) / len(v), sum(t for _, t in v) / len(v)) for n, v in seen.items() if v]
    backend = write_plot(
        points, png, x_label="weight memory (GiB)", y_label="output tok/s",
        title="Qwen3-30B-A3B shape, H100 80GB, vLLM 0.26, 256 x 1024/256",
    )  # fmt: skip
    print(f"{png} ({backend}): " + ", ".join(f"{lab} {w:.2f} GiB {t:.0f} tok/s" for lab, w, t in points))


if __name__ == "__main__":
    main(*sys.argv[1:3])
