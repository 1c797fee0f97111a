"""``vllm-mixed bench`` end to end on the CPU build: vLLM's own throughput
benchmark on the tiny mix and on all-bf16, one table, JSON and a PNG. Two
engine starts (about 30 s each on two cores, eager mode)."""

from __future__ import annotations

import argparse
import json
import re

from PIL import Image

from tests.e2e.conftest import write_recipe
from vllm_mixed.commands import bench as bench_command
from vllm_mixed.plot import PLOT_SIZE


def test_bench_mix_vs_bf16(tiny_dirs, tmp_path, capsys) -> None:
    recipe = write_recipe(tiny_dirs, "mix", tmp_path)
    plot, work = tmp_path / "out.png", tmp_path / "work"
    top = argparse.ArgumentParser(prog="vllm-mixed")
    bench_command.add_parser(top.add_subparsers(dest="command", required=True))
    args = top.parse_args(
        ["bench", str(recipe), "--vs", "bf16", "--plot", str(plot), "--json", "--enforce-eager",
         "--work-dir", str(work), "--", "--max-num-seqs", "8"]
    )  # fmt: skip
    assert bench_command.run(args) == 0
    out, err = capsys.readouterr()
    with capsys.disabled():
        print("\n" + err)

    report = json.loads(out)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["mix", "bf16"]
    assert rows["mix"]["source"] is None and rows["bf16"]["source"] == "bf16"
    for r in rows.values():
        assert r["output_tok_s"] > 0 and r["total_tok_s"] > r["output_tok_s"]
        assert r["platform"] == "cpu" and r["weight_from"] == "plan" and r["load_from"] == "vllm-mixed loader"
        assert r["facts"]["output_tokens"] == 8 * 16  # random dataset, ignore_eos: num_prompts x output len
        log = (work / f"{r['name']}.log").read_text()
        assert "--load-format mixed" in log and "--max-num-seqs 8" in log  # same code path, passthrough reached vLLM
    # the mix reads int4 experts: fewer planned bytes than all-bf16; on the CPU each row holds what the plan predicts
    assert rows["mix"]["weight_bytes"] < rows["bf16"]["weight_bytes"]
    for r in rows.values():
        assert abs(r["resident_bytes"] / r["resident_predicted_bytes"] - 1) <= 0.02, r["facts"]["resident"]
        assert f"resident on the CPU build, {r['name']}: " in err
    assert report["plot_backend"] in ("pillow", "matplotlib")

    table = {line.split()[0]: line.split() for line in err.splitlines() if re.match(r"(mix|bf16)\s+\d", line)}
    assert set(table) == {"mix", "bf16"}
    for name, cells in table.items():
        assert float(cells[1]) == round(rows[name]["output_tok_s"], 1) > 0

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size == PLOT_SIZE
