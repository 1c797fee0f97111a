"""``bench``: vLLM's own offline throughput benchmark (``vllm bench
throughput``) on a recipe and on each pure source, with identical arguments,
in one table.

Every row goes through the same code path: the recipe, or a pure copy of it
(one source as ``default``, no rules, the same ``base``), is composed into a
temporary directory and served with ``--load-format mixed``; rows differ only
in where the weights come from. Each row runs in a fresh process group that
logs to a file (a pipe nobody drains can hang a lingering engine) and is killed
afterwards, so no engine holds memory into the next row.

``python -m vllm_mixed.bench ARGS`` runs vLLM's benchmark itself: its own
``add_cli_args`` and ``main``, which is all ``vllm bench throughput`` runs. The
CPU build's ``vllm`` script and ``python -m vllm.entrypoints.cli.main`` both
fail there (``PackageNotFoundError: vllm``), so every platform uses this entry.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_mixed.errors import MixedError

if TYPE_CHECKING:
    from vllm_mixed.plan import LoadPlan

__all__ = [
    "BenchRow", "LogFacts", "add_bench_arguments", "choose_load", "choose_weight", "cmd_bench", "parse_log", "write_plot",
]  # fmt: skip

PLOT_SIZE = (800, 500)
TAIL_LINES = 40
# vLLM prints its weight memory in GiB with two decimals: below this its rounding exceeds 1%, so the plan is used
MIN_MEASURED_GIB = 0.5
_PLATFORM_MARK = "vllm-mixed bench: platform"


@dataclass(frozen=True)
class LogFacts:
    """What one row's log says; ``None`` where the line is absent."""

    requests_s: float | None = None
    total_tok_s: float | None = None
    output_tok_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    vllm_weight_gib: float | None = None  # "Model loading took X GiB" (GPU model runner), summed over workers
    vllm_model_load_s: float | None = None  # "... GiB memory and Y seconds", slowest worker
    vllm_weights_load_s: float | None = None  # "Loading weights took X seconds" (vLLM's default loader)
    plugin_load_s: float | None = None  # "vllm-mixed: loaded N tensors, X MiB from K files in T s"
    plugin_tensors: int | None = None
    platform: str | None = None  # written by this module's driver: cpu, cuda, ...


_FLOAT = r"(\d+(?:\.\d+)?)"
_THROUGHPUT = re.compile(rf"Throughput: {_FLOAT} requests/s, {_FLOAT} total tokens/s(?:, {_FLOAT} output tokens/s)?")
_MODEL_LOADING = re.compile(rf"Model loading took {_FLOAT} GiB(?: memory)? and {_FLOAT} seconds")
_MODEL_LOADING_GIB = re.compile(rf"Model loading took {_FLOAT} GiB")
_LOADING_WEIGHTS = re.compile(rf"Loading weights took {_FLOAT} seconds")
_PLUGIN = re.compile(rf"vllm-mixed: loaded (\d+) tensors, {_FLOAT} MiB from (\d+) files in {_FLOAT} s")


def parse_log(text: str) -> LogFacts:
    """Read the numbers vLLM and the plugin log. With tensor parallelism each
    worker logs its own load: weights are summed, load times take the slowest."""
    tp = _THROUGHPUT.findall(text)
    req, total, out = (float(v) if v else None for v in tp[-1]) if tp else (None, None, None)
    prompt = re.findall(r"Total num prompt tokens:\s+(\d+)", text)
    output = re.findall(r"Total num output tokens:\s+(\d+)", text)
    if out is None and total and output and prompt:  # releases that print no output tokens/s
        out = total * int(output[-1]) / (int(output[-1]) + int(prompt[-1]))
    gib = [float(g) for g in _MODEL_LOADING_GIB.findall(text)]
    model_s = [float(s) for _, s in _MODEL_LOADING.findall(text)]
    weights_s = [float(s) for s in _LOADING_WEIGHTS.findall(text)]
    plugin = _PLUGIN.findall(text)
    platform = re.findall(rf"^{_PLATFORM_MARK} (\w+)", text, re.M)
    return LogFacts(
        requests_s=req,
        total_tok_s=total,
        output_tok_s=out,
        prompt_tokens=int(prompt[-1]) if prompt else None,
        output_tokens=int(output[-1]) if output else None,
        vllm_weight_gib=sum(gib) if gib else None,
        vllm_model_load_s=max(model_s) if model_s else None,
        vllm_weights_load_s=max(weights_s) if weights_s else None,
        plugin_load_s=max(float(p[3]) for p in plugin) if plugin else None,
        plugin_tensors=sum(int(p[0]) for p in plugin) if plugin else None,
        platform=platform[-1] if platform else None,
    )


@dataclass
class BenchRow:
    """One benchmarked model: the recipe, or all weights from one source."""

    name: str
    source: str | None  # None: the recipe itself
    model: str
    log: str
    wall_s: float
    output_tok_s: float
    total_tok_s: float | None
    requests_s: float | None
    weight_bytes: int
    weight_from: str  # "vllm": measured by vLLM; "plan": the planned checkpoint bytes
    planned_bytes: int
    resident_bytes: int | None  # CPU build: the dequantized footprint actually held
    load_s: float | None
    load_from: str | None  # "vllm-mixed loader", "vllm loader" or "vllm model runner"
    platform: str | None
    facts: dict[str, object]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` flags. Defaults suit the tiny model on a small CPU; on a
    GPU pass real sizes. Everything after ``--`` goes to vLLM unchanged."""
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument(
        "--vs", action="append", default=[], metavar="SOURCE",
        help="also bench all weights from this source of the recipe (repeat, comma-separate, or 'all')",
    )  # fmt: skip
    parser.add_argument("--plot", metavar="PNG", help="write weight memory against output tok/s as a PNG")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout (the table goes to stderr)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--random-input-len", type=int, default=64)
    parser.add_argument("--random-output-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.3, help="on the CPU build: the share of RAM for the KV cache"
    )
    parser.add_argument(
        "--enforce-eager", action="store_true",
        help="no torch.compile/CUDA graphs (on a small CPU this saves ~45 s per row)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per row (default 1200)")
    parser.add_argument("--work-dir", help="keep composed dirs, logs and vLLM's JSON here (default: a temp dir)")
    parser.set_defaults(vllm_args=[], func=cmd_bench)
    parser.epilog = (
        "Arguments after `--` are passed to `vllm bench throughput` for every row, e.g. -- --max-num-seqs 64"
    )
    _split_passthrough(parser)


def _split_passthrough(parser: argparse.ArgumentParser) -> None:
    """Set aside everything after the first ``--`` before the subcommand
    parses: argparse cannot mix a positional, options and a ``--`` tail
    (``nargs='*'`` and ``REMAINDER`` each misparse it, Python 3.10-3.13)."""
    parse = parser.parse_known_args

    def parse_known_args(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        args = list(sys.argv[1:] if args is None else args)
        tail: list[str] = []
        if "--" in args:
            cut = args.index("--")
            args, tail = args[:cut], args[cut + 1 :]
        ns, extra = parse(args, namespace)
        ns.vllm_args = [*getattr(ns, "vllm_args", []), *tail]
        return ns, extra

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def cmd_bench(args: argparse.Namespace) -> int:
    """Compose and bench every row, print one table (or JSON), optionally plot."""
    from vllm_mixed.cli import human, table

    models = _compose_rows(args)  # validates the recipe and every pure copy before any engine starts
    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="vllm-mixed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    flags = _vllm_flags(args)
    rows: list[BenchRow] = []
    try:
        for name, (source, plan) in models.items():
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            rows.append(_run_row(name, source, plan, work, flags, args.timeout))
            print(f"bench: {name}: {rows[-1].output_tok_s:.1f} output tok/s ({rows[-1].wall_s:.0f} s)", file=sys.stderr)
    except BaseException:
        print(f"bench: logs and composed directories kept in {work}", file=sys.stderr)
        raise
    if not keep:
        shutil.rmtree(work, ignore_errors=True)

    backend = None
    if args.plot:
        unit, scale = ("GiB", 2**30) if max(r.weight_bytes for r in rows) >= 2**30 else ("MiB", 2**20)
        froms = sorted({r.weight_from for r in rows})
        backend = write_plot(
            [(r.name, r.weight_bytes / scale, r.output_tok_s) for r in rows], args.plot,
            x_label=f"weight memory, {unit} ({' / '.join(_WEIGHT_NOTE[f][0] for f in froms)})",
            y_label="output tok/s", title=f"vllm bench throughput: {Path(args.recipe).name}",
        )  # fmt: skip

    headers = ["row", "output tok/s", "total tok/s", "req/s", "weight", "weight from", "load s", "load from"]
    body = [
        (
            r.name, f"{r.output_tok_s:.1f}", _num(r.total_tok_s, 1), _num(r.requests_s, 2),
            human(r.weight_bytes), r.weight_from, _num(r.load_s, 2), r.load_from or "-",
        )
        for r in rows
    ]  # fmt: skip
    lines = [table(headers, body, right={1, 2, 3, 4, 6}), ""]
    lines.append("vllm bench throughput, the same for every row: " + " ".join(flags))
    for f in sorted({r.weight_from for r in rows}):
        lines.append(f"weight ({f}): {_WEIGHT_NOTE[f][1]}")
    resident = {r.resident_bytes for r in rows if r.resident_bytes is not None}
    if resident:
        shown = ", ".join(human(b) for b in sorted(resident))
        lines.append(
            f"resident on the CPU build: {shown} per row: quantized layers are dequantized to the model dtype at load, "
            "so every row holds the bf16 footprint and runs the same bf16 kernels (throughput differences are noise)"
        )
    for f in sorted({r.load_from for r in rows if r.load_from}):
        lines.append(f"load s ({f}): {_LOAD_NOTE[f]}")
    if args.plot:
        lines.append(f"plot: {args.plot} ({backend})")
    text = "\n".join(lines)
    if args.json:
        print(text, file=sys.stderr)
        report = {
            "recipe": str(args.recipe),
            "vllm_bench_args": flags,
            "rows": [asdict(r) for r in rows],
            "plot": args.plot,
            "plot_backend": backend,
        }
        print(json.dumps(report, indent=2))
    else:
        print(text)
    return 0


_WEIGHT_NOTE = {
    "vllm": ("measured", "vLLM's 'Model loading took X GiB' (memory measured after loading)"),
    "plan": (
        "planned",
        "the plan's bytes of the checkpoint tensors read (vLLM logged no weight memory, as on the CPU build, "
        f"or under {MIN_MEASURED_GIB} GiB, where its two-decimal GiB is too coarse)",
    ),
}
_LOAD_NOTE = {
    "vllm-mixed loader": "the plugin loader's time to stream the planned tensors ('vllm-mixed: loaded ... in T s')",
    "vllm loader": "vLLM's 'Loading weights took X seconds'",
    "vllm model runner": "vLLM's 'Model loading took ... and Y seconds' (model init + weights)",
}


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _compose_rows(args: argparse.Namespace) -> dict[str, tuple[str | None, LoadPlan]]:
    """Row name -> (source or None, plan): the recipe, then each ``--vs``
    source as a pure recipe with the same base."""
    from vllm_mixed.plan import build_plan, open_sources
    from vllm_mixed.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    sources = open_sources(recipe)
    wanted: list[str] = []
    for item in args.vs:
        for name in filter(None, (s.strip() for s in item.split(","))):
            if name == "all":
                wanted.extend(recipe.sources)
            elif name not in recipe.sources:
                raise MixedError(
                    f"--vs {name!r}: not a source of recipe {args.recipe}; use one of: "
                    f"{', '.join(sorted(recipe.sources))}, or 'all'"
                )
            else:
                wanted.append(name)
    recipe_name = Path(args.recipe).stem
    rows: dict[str, tuple[str | None, LoadPlan]] = {}
    rows[f"{recipe_name} (recipe)" if recipe_name in wanted else recipe_name] = (None, build_plan(recipe, sources))
    for name in dict.fromkeys(wanted):
        pure = recipe.only(name)
        rows[name] = (name, build_plan(pure, sources))
    return rows


def _vllm_flags(args: argparse.Namespace) -> list[str]:
    """The benchmark arguments every row shares (the model dir comes first)."""
    flags = [
        "--load-format", "mixed", "--dataset-name", "random",
        "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.random_input_len),
        "--random-output-len", str(args.random_output_len), "--seed", str(args.seed),
        "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
    ]  # fmt: skip
    if args.enforce_eager:
        flags.append("--enforce-eager")
    return [*flags, *args.vllm_args]


def _run_row(name: str, source: str | None, plan: LoadPlan, work: Path, flags: list[str], timeout: float) -> BenchRow:
    """Compose one row and run vLLM's benchmark on it in a fresh process group."""
    from vllm_mixed.compose import compose

    slug = re.sub(r"[^\w.-]+", "-", name).strip("-")
    model = compose(plan, work / slug)
    log, out_json = work / f"{slug}.log", work / f"{slug}.json"
    cmd = [sys.executable, "-m", "vllm_mixed.bench", "--model", str(model), *flags, "--output-json", str(out_json)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU build; ignored elsewhere
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill_group(proc.pid)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    facts = parse_log(text)
    if rc is None:
        raise MixedError(f"row {name!r} did not finish in {timeout:.0f} s; see {log}; raise --timeout{_tail(text)}")
    if rc != 0 or facts.output_tok_s is None:
        why = f"exited with status {rc}" if rc else "printed no 'Throughput:' line"
        raise MixedError(f"row {name!r}: vLLM's benchmark {why}; full log: {log}{_tail(text)}")
    resident = _resident_bytes(plan) if facts.platform == "cpu" else None
    (weight, weight_from), (load_s, load_from) = choose_weight(facts, plan.total_bytes), choose_load(facts)
    return BenchRow(
        name=name, source=source, model=str(model), log=str(log), wall_s=round(wall, 1),
        output_tok_s=facts.output_tok_s, total_tok_s=facts.total_tok_s, requests_s=facts.requests_s,
        weight_bytes=weight, weight_from=weight_from, planned_bytes=plan.total_bytes, resident_bytes=resident,
        load_s=load_s, load_from=load_from, platform=facts.platform, facts=asdict(facts),
    )  # fmt: skip


def choose_weight(facts: LogFacts, planned_bytes: int) -> tuple[int, str]:
    """The weight memory to report, and where it comes from: vLLM's measured
    figure when it is precise enough, else the plan's bytes."""
    if facts.vllm_weight_gib is not None and facts.vllm_weight_gib >= MIN_MEASURED_GIB:
        return round(facts.vllm_weight_gib * 2**30), "vllm"
    return planned_bytes, "plan"


def choose_load(facts: LogFacts) -> tuple[float | None, str | None]:
    """The load time to report: the plugin's streaming time (every row uses the
    mixed loader), else what vLLM logged (e.g. with ``-- --load-format dummy``)."""
    for seconds, what in (
        (facts.plugin_load_s, "vllm-mixed loader"),
        (facts.vllm_weights_load_s, "vllm loader"),
        (facts.vllm_model_load_s, "vllm model runner"),
    ):
        if seconds is not None:
            return seconds, what
    return None, None


def _tail(text: str) -> str:
    lines = text.rstrip().splitlines()[-TAIL_LINES:]
    return f"\n--- last {len(lines)} lines ---\n" + "\n".join(line[-400:] for line in lines)


def _resident_bytes(plan: LoadPlan) -> int:
    """What the CPU build holds: every weight dequantized to the model dtype."""
    elements = sum(math.prod(m.shape) for p in plan.layers for m in p.layer.members)
    return elements * (2 if plan.recipe.dtype in ("bfloat16", "float16") else 4)


def _kill_group(pgid: int, wait_s: float = 15.0) -> None:
    """SIGKILL whatever is left of a row's process group and wait until it is
    gone, so the next row starts with the memory free."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    """Any non-zombie process left in the group (zombies hold no memory and
    may never be reaped in a container without an init)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# --- the plot ------------------------------------------------------------------------------------------------------


def write_plot(
    points: Sequence[tuple[str, float, float]], path: str | Path, *, x_label: str = "weight memory",
    y_label: str = "output tok/s", title: str = "", backend: str = "auto",
) -> str:  # fmt: skip
    """Write a labelled scatter (label, x, y) of ``PLOT_SIZE`` pixels as PNG.
    matplotlib when importable (``backend='auto'``), else Pillow, so the plot
    works on a fresh machine; returns the backend used."""
    if backend not in ("auto", "matplotlib", "pillow"):
        raise MixedError(f"plot backend {backend!r}: use one of: auto, matplotlib, pillow")
    if not points:
        raise MixedError("nothing to plot: no rows were benchmarked")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if backend != "pillow":
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            if backend == "matplotlib":
                raise MixedError(
                    "matplotlib is not installed; `pip install matplotlib` or use the Pillow plot"
                ) from None
        else:
            fig = Figure(figsize=(PLOT_SIZE[0] / 100, PLOT_SIZE[1] / 100), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            for i, (label, x, y) in enumerate(points):
                ax.scatter([x], [y], s=60, color=f"C{i % 10}", zorder=3)
                ax.annotate(label, (x, y), xytext=(7, 7), textcoords="offset points")
            ax.set_xlim(0, _ticks(max(p[1] for p in points) * 1.15)[-1])
            ax.set_ylim(0, _ticks(max(p[2] for p in points) * 1.15)[-1])
            ax.set(xlabel=x_label, ylabel=y_label, title=title)
            ax.grid(True, alpha=0.3)
            fig.savefig(path, dpi=100, format="png")
            return "matplotlib"
    _plot_pillow(points, path, x_label, y_label, title)
    return "pillow"


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _ticks(top: float) -> list[float]:
    """0 up to at least ``top`` in round steps (1, 2 or 5 times a power of ten)."""
    top = top if top > 0 else 1.0
    raw = top / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _plot_pillow(
    points: Sequence[tuple[str, float, float]], path: Path, x_label: str, y_label: str, title: str
) -> None:
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    width, height = PLOT_SIZE
    left, right, top, bottom = 80, width - 30, 50, height - 60
    img = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(img)
    xt = _ticks(max(p[1] for p in points) * 1.15)
    yt = _ticks(max(p[2] for p in points) * 1.15)
    px = lambda x: left + (right - left) * x / xt[-1]  # noqa: E731
    py = lambda y: bottom - (bottom - top) * y / yt[-1]  # noqa: E731
    for x in xt:
        draw.line([(px(x), top), (px(x), bottom)], fill="#e6e6e6")
        draw.text((px(x), bottom + 6), f"{x:g}", fill="black", font=font, anchor="ma")
    for y in yt:
        draw.line([(left, py(y)), (right, py(y))], fill="#e6e6e6")
        draw.text((left - 6, py(y)), f"{y:g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, height - 22), x_label, fill="black", font=font, anchor="mm")
    draw.text((left, top - 8), y_label, fill="black", font=font, anchor="ld")
    draw.text((width / 2, 16), title, fill="black", font=font, anchor="mm")
    placed: list[tuple[float, float, float, float]] = []  # label boxes drawn so far: close points must not overlap
    order = sorted(range(len(points)), key=lambda i: -points[i][2])
    for i in order:
        label, x, y = points[i]
        cx, cy, r = px(x), py(y), 6
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_COLORS[i % len(_COLORS)], outline="black")
        flip = cx + 10 + draw.textlength(label, font=font) > right
        anchor, tx, ty = ("rd" if flip else "ld"), (cx - 10 if flip else cx + 10), cy - 8
        box = draw.textbbox((tx, ty), label, font=font, anchor=anchor)
        while any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            ty += box[3] - box[1] + 4
            box = draw.textbbox((tx, ty), label, font=font, anchor=anchor)
        if ty != cy - 8:
            draw.line([(cx, cy), (tx, (box[1] + box[3]) / 2)], fill="#888888")
        draw.text(
            (tx, ty), label, fill=_COLORS[i % len(_COLORS)] if ty != cy - 8 else "black", font=font, anchor=anchor
        )
        placed.append(box)
    img.save(path, format="PNG")


# --- the driver: vLLM's own `bench throughput` -----------------------------------------------------------------------


def _run_vllm_throughput(argv: list[str]) -> None:
    """``vllm bench throughput ARGV``: vLLM's own flags and main. The platform
    line lets the parent label memory without importing vLLM itself."""
    from vllm.benchmarks.throughput import add_cli_args, main
    from vllm.platforms import current_platform

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older releases
        from vllm.utils import FlexibleArgumentParser

    print(f"{_PLATFORM_MARK} {current_platform.device_type or 'unknown'}", flush=True)
    parser = FlexibleArgumentParser(prog="vllm bench throughput")
    add_cli_args(parser)
    args = parser.parse_args(argv)
    try:
        from vllm.logger import configure_logging_from_args  # what `vllm bench` does first, where it exists
    except ImportError:
        pass
    else:
        configure_logging_from_args(args)
    main(args)


if __name__ == "__main__":  # the guard matters: vLLM's engine processes re-import the main module
    _run_vllm_throughput(sys.argv[1:])
