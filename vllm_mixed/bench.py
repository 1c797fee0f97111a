"""``bench``: vLLM's own offline throughput benchmark (``vllm bench
throughput``) on a recipe and on each pure source, with identical arguments.

Every row goes through the same code path: the recipe, or a pure copy of it
(one source as ``default``, no rules, the same ``base``), is composed into a
work directory and served with ``--load-format mixed``; rows differ only in
where the weights come from. Each row runs through
:func:`vllm_mixed.processes.run_isolated` (its own process group, output to a
log file, the group killed afterwards), so no engine holds memory into the
next row. The command (:mod:`vllm_mixed.commands.bench`) prints the table.

``python -m vllm_mixed.bench ARGS`` runs vLLM's benchmark itself: its own
``add_cli_args`` and ``main``, which is all ``vllm bench throughput`` runs. The
CPU build's ``vllm`` script and ``python -m vllm.entrypoints.cli.main`` both
fail there (``PackageNotFoundError: vllm``), so every platform uses this entry.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_mixed.errors import MixedError
from vllm_mixed.resident import ResidentReport

if TYPE_CHECKING:
    from vllm_mixed.plan import LoadPlan

__all__ = [
    "LOAD_NOTES", "WEIGHT_NOTES", "BenchRow", "BenchSettings", "LogFacts", "bench_plans", "choose_load",
    "choose_weight", "parse_log", "run_bench", "run_row",
]  # fmt: skip

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
    resident: dict[str, int | None] | None = None  # CPU build: the loader's measurement (vllm_mixed.resident)


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
    resident = ResidentReport.parse(text)
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
        resident=resident.to_dict() if resident else None,
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
    resident_bytes: int | None  # CPU build: the weight bytes its model holds, measured after loading
    resident_predicted_bytes: int | None  # CPU build: what the plan predicts it holds (cpu_resident_bytes)
    load_s: float | None
    load_from: str | None  # "vllm-mixed loader", "vllm loader" or "vllm model runner"
    platform: str | None
    facts: dict[str, object]


@dataclass(frozen=True)
class BenchSettings:
    """The benchmark arguments every row shares. Defaults suit the tiny
    model on a small CPU; on a GPU pass real sizes."""

    num_prompts: int = 8
    random_input_len: int = 64
    random_output_len: int = 16
    seed: int = 0
    max_model_len: int = 512
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = False
    timeout_s: float = 1200.0  # per row
    vllm_args: tuple[str, ...] = ()  # passed to `vllm bench throughput` unchanged, after the flags above

    def vllm_flags(self) -> list[str]:
        """The ``vllm bench throughput`` arguments of every row (the model dir comes first)."""
        flags = [
            "--load-format", "mixed", "--dataset-name", "random",
            "--num-prompts", str(self.num_prompts), "--random-input-len", str(self.random_input_len),
            "--random-output-len", str(self.random_output_len), "--seed", str(self.seed),
            "--max-model-len", str(self.max_model_len), "--gpu-memory-utilization", str(self.gpu_memory_utilization),
        ]  # fmt: skip
        if self.enforce_eager:
            flags.append("--enforce-eager")
        return [*flags, *self.vllm_args]


# where a row's weight memory comes from: (short label for the plot axis, what it is)
WEIGHT_NOTES = {
    "vllm": ("measured", "vLLM's 'Model loading took X GiB' (memory measured after loading)"),
    "plan": (
        "planned",
        "the plan's bytes of the checkpoint tensors read (vLLM logged no weight memory, as on the CPU build, "
        f"or under {MIN_MEASURED_GIB} GiB, where its two-decimal GiB is too coarse)",
    ),
}
# where a row's load time comes from
LOAD_NOTES = {
    "vllm-mixed loader": "the plugin loader's time to stream the planned tensors ('vllm-mixed: loaded ... in T s')",
    "vllm loader": "vLLM's 'Loading weights took X seconds'",
    "vllm model runner": "vLLM's 'Model loading took ... and Y seconds' (model init + weights)",
}


def bench_plans(recipe_path: str | Path, vs: Sequence[str] = ()) -> dict[str, tuple[str | None, LoadPlan]]:
    """Row name -> (source or None, plan): the recipe, then each source named
    in ``vs`` (items may be comma-separated; ``all``: every source) as a pure
    recipe with the same base. Every plan is validated here."""
    from vllm_mixed.plan import build_plan, open_sources
    from vllm_mixed.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    sources = open_sources(recipe)
    wanted: list[str] = []
    for item in vs:
        for name in filter(None, (s.strip() for s in item.split(","))):
            if name == "all":
                wanted.extend(recipe.sources)
            elif name not in recipe.sources:
                raise MixedError(
                    f"--vs {name!r}: not a source of recipe {recipe_path}; use one of: "
                    f"{', '.join(sorted(recipe.sources))}, or 'all'"
                )
            else:
                wanted.append(name)
    recipe_name = Path(recipe_path).stem
    rows: dict[str, tuple[str | None, LoadPlan]] = {}
    rows[f"{recipe_name} (recipe)" if recipe_name in wanted else recipe_name] = (None, build_plan(recipe, sources))
    for name in dict.fromkeys(wanted):
        rows[name] = (name, build_plan(recipe.only(name), sources))
    return rows


def run_bench(
    recipe_path: str | Path,
    vs: Sequence[str] = (),
    settings: BenchSettings | None = None,
    work_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Validate every row, then bench each in turn. ``work_dir`` keeps the
    composed dirs, logs and vLLM's JSON (default: a temp dir, removed after
    success and kept after a failure)."""
    settings = settings or BenchSettings()
    say = progress or (lambda _msg: None)
    models = bench_plans(recipe_path, vs)  # validates the recipe and every pure copy before any engine starts
    keep = work_dir is not None
    work = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix="vllm-mixed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    flags = settings.vllm_flags()
    rows: list[BenchRow] = []
    try:
        for name, (source, plan) in models.items():
            say(f"bench: {name} ...")
            rows.append(run_row(name, source, plan, work, flags, settings.timeout_s))
            say(f"bench: {name}: {rows[-1].output_tok_s:.1f} output tok/s ({rows[-1].wall_s:.0f} s)")
    except BaseException:
        say(f"bench: logs and composed directories kept in {work}")
        raise
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def run_row(name: str, source: str | None, plan: LoadPlan, work: Path, flags: list[str], timeout: float) -> BenchRow:
    """Compose one row and run vLLM's benchmark on it in a fresh process group."""
    from vllm_mixed.compose import compose
    from vllm_mixed.processes import run_isolated

    slug = re.sub(r"[^\w.-]+", "-", name).strip("-")
    model = compose(plan, work / slug)
    log, out_json = work / f"{slug}.log", work / f"{slug}.json"
    cmd = [sys.executable, "-m", "vllm_mixed.bench", "--model", str(model), *flags, "--output-json", str(out_json)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU build; ignored elsewhere
    start = time.perf_counter()
    rc = run_isolated(cmd, log, timeout, env)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    facts = parse_log(text)
    if rc is None:
        raise MixedError(f"row {name!r} did not finish in {timeout:.0f} s; see {log}; raise --timeout{_tail(text)}")
    if rc != 0 or facts.output_tok_s is None:
        why = f"exited with status {rc}" if rc else "printed no 'Throughput:' line"
        raise MixedError(f"row {name!r}: vLLM's benchmark {why}; full log: {log}{_tail(text)}")
    resident = predicted = None
    if facts.platform == "cpu":
        from vllm_mixed.cpu_kernels import cpu_resident_bytes

        predicted = cpu_resident_bytes(plan)
        resident = facts.resident["held"] if facts.resident else None
    (weight, weight_from), (load_s, load_from) = choose_weight(facts, plan.total_bytes), choose_load(facts)
    return BenchRow(
        name=name, source=source, model=str(model), log=str(log), wall_s=round(wall, 1),
        output_tok_s=facts.output_tok_s, total_tok_s=facts.total_tok_s, requests_s=facts.requests_s,
        weight_bytes=weight, weight_from=weight_from, planned_bytes=plan.total_bytes, resident_bytes=resident,
        resident_predicted_bytes=predicted,
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


# --- the driver: vLLM's own `bench throughput` -----------------------------------------------------------------------


def _run_vllm_throughput(argv: list[str]) -> None:
    """``vllm bench throughput ARGV``: vLLM's own flags and main. The platform
    line lets the parent label memory without importing vLLM itself."""
    from vllm.benchmarks.throughput import add_cli_args, main

    from vllm_mixed.vllm_compat import configure_logging_from_args, device_type, flexible_argument_parser

    print(f"{_PLATFORM_MARK} {device_type()}", flush=True)
    parser = flexible_argument_parser()(prog="vllm bench throughput")
    add_cli_args(parser)
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    main(args)


if __name__ == "__main__":  # the guard matters: vLLM's engine processes re-import the main module
    _run_vllm_throughput(sys.argv[1:])
