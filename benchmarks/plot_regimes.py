#!/usr/bin/env python3
"""One panel per regime of ``gpu_regimes.py`` results files: weight memory
(as vLLM reports it) against output tok/s for every row that has a number in
that regime (batch 1 as 1000 / ms per token). Panels are drawn with the
plotter of ``vllm-mixed bench`` (matplotlib or Pillow) and set side by side
with Pillow. Several files (each a list of rows, or ``{"rows": [...]}``) are
merged: give one call's file per regime, so that a panel compares rows timed
in one call; ``FILE:batch1,decode`` takes only those regimes from a file.

Usage: python benchmarks/plot_regimes.py RESULTS.json[:REGIMES] [RESULTS.json[:REGIMES] ...] OUT.png
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PANELS = {  # regime -> (title, how a row's number is read)
    "batch1": ("batch 1, 32/256", lambda m: 1000 / m["ms_per_token"] if m.get("ms_per_token") else None),
    "prefill": ("prefill-heavy, 256 x 1024/256", lambda m: m.get("output_tok_s")),
    "decode": ("decode-heavy, 256 x 128/1024", lambda m: m.get("output_tok_s")),
    "capped": ("memory-capped, 512 x 2048/512, 48 GiB", lambda m: m.get("output_tok_s")),
}
LABELS = {"stock-fp8": "stock FP8", "stock-bf16": "stock BF16", "stock-gptq": "stock GPTQ", "mix-a": "mix A",
          "mix-b": "mix B"}  # fmt: skip


def read_rows(arg: str) -> list[dict]:
    """A file's rows; ``FILE:REGIMES``: each row keeps only those regimes' numbers."""
    path, _, only = arg.partition(":")
    data = json.loads(Path(path).read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    if not only:
        return rows
    keep = set(only.split(","))
    if unknown := keep - set(PANELS):
        raise SystemExit(f"{arg}: unknown regime(s) {', '.join(sorted(unknown))}; known: {', '.join(PANELS)}")
    return [{k: v for k, v in r.items() if k not in PANELS or k in keep} for r in rows]


def main(results: list[str], png: str, title: str = "Qwen3-30B-A3B shape, H200, vLLM 0.26") -> None:
    from PIL import Image

    from vllm_mixed.plot import PLOT_SIZE, write_plot

    rows = [row for path in results for row in read_rows(path)]
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for regime, (name, read) in PANELS.items():
            points = []
            for r in rows:
                m = r.get(regime)
                y = read(m) if isinstance(m, dict) else None
                if y and r.get("weights_gib"):
                    base, _, variant = r["row"].partition("@")
                    points.append((LABELS.get(base, base) + (f" @{variant}" if variant else ""), r["weights_gib"], y))
            if points:
                out = Path(tmp) / f"{regime}.png"
                write_plot(points, out, x_label="weight memory (GiB)", y_label="output tok/s", title=f"{title}: {name}")
                panels.append(Image.open(out).convert("RGB"))
                print(f"{regime}: " + ", ".join(f"{lab} {w:.2f} GiB {y:.0f} tok/s" for lab, w, y in points))
        if not panels:
            raise SystemExit(f"{', '.join(results)}: no row has a number in any regime")
        canvas = Image.new(
            "RGB", (PLOT_SIZE[0] * min(2, len(panels)), PLOT_SIZE[1] * ((len(panels) + 1) // 2)), "white"
        )
        for i, im in enumerate(panels):
            canvas.paste(im, (PLOT_SIZE[0] * (i % 2), PLOT_SIZE[1] * (i // 2)))
        canvas.save(png)


if __name__ == "__main__":
    if len(sys.argv) < 3 or not sys.argv[-1].endswith(".png"):
        raise SystemExit("usage: plot_regimes.py RESULTS.json [RESULTS.json ...] OUT.png")
    main(sys.argv[1:-1], sys.argv[-1])
