"""``vllm-mixed eval``: how far a recipe's model is from a reference checkpoint,
measured on vLLM itself.

Both models go through the same code path with the same settings: the recipe
and the reference (one source of the recipe, as a pure recipe: ``default`` =
that source, no rules, the recipe's own base and dtype) are each composed into
a directory and served with ``load_format="mixed"``, so only the weights
differ. Each engine runs in a fresh ``python -m vllm_mixed.evaluate_worker``
process (logging to a file, writing JSON) and scores the prompts
teacher-forced; :mod:`vllm_mixed.eval_metrics` turns the two sets of prompt
logprobs into KL(reference || recipe), top-1 agreement and perplexities.

Importing this module imports neither vLLM nor torch (the CLI stays light);
the command (:mod:`vllm_mixed.commands.evaluate`) parses and prints.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_mixed.errors import MixedError

if TYPE_CHECKING:
    from vllm_mixed.eval_metrics import Scores
    from vllm_mixed.plan import LoadPlan
    from vllm_mixed.recipe import Recipe

__all__ = [
    "EngineResult", "EngineSettings", "EvalReport", "Prompt", "evaluate", "load_prompts", "reference_recipe",
    "reference_source", "run_engine",
]  # fmt: skip

Prompt = str | list[int]  # text, or token ids given as such
LARGE_VOCAB = 32768  # above this, full-vocabulary logprobs get slow and large
LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class EngineSettings:
    """vLLM engine arguments, identical for both runs. The defaults suit
    vLLM's CPU build on a small box; raise them on a GPU."""

    max_model_len: int = 512
    gpu_memory_utilization: float = 0.3
    max_num_seqs: int = 8
    tensor_parallel_size: int = 1
    seed: int = 0
    timeout_s: float = 3600.0

    @property
    def in_process(self) -> bool:
        """One GPU (or the CPU build): engine core and worker in the worker
        process itself, which starts in a third of the time of vLLM's default
        three processes and gives the same logprobs."""
        return self.tensor_parallel_size == 1

    def llm_kwargs(self, dtype: str) -> dict[str, Any]:
        kwargs = {
            "dtype": dtype,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_num_seqs,
            "tensor_parallel_size": self.tensor_parallel_size,
            "seed": self.seed,
            "enforce_eager": True,  # prompts are scored once: graph capture would cost more than it saves
        }
        if self.in_process:
            kwargs["distributed_executor_backend"] = "uni"
        return kwargs

    def env(self) -> dict[str, str]:
        """The worker's environment; variables already set win."""
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on vLLM's CPU build
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.in_process:
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return env


@dataclass(frozen=True)
class EngineResult:
    """One engine's teacher-forced logprobs: per prompt its token ids and,
    per position ``i``, token id -> logprob for token ``i + 1``."""

    prompt_token_ids: list[list[int]]
    positions: list[list[dict[int, float]]]
    vocab_size: int
    top_k: int  # 0: the whole vocabulary
    init_s: float = 0.0
    run_s: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineResult:
        """From what the worker writes (``result.json`` of a run)."""
        return cls(
            prompt_token_ids=[list(map(int, ids)) for ids in data["prompt_token_ids"]],
            positions=[
                [dict(zip(map(int, row["ids"]), map(float, row["logprobs"]))) for row in rows]
                for rows in data["positions"]
            ],
            vocab_size=int(data["vocab_size"]),
            top_k=max(int(data["top_k"]), 0),
            init_s=float(data.get("init_s") or 0.0),
            run_s=float(data.get("run_s") or 0.0),
        )

    @classmethod
    def load(cls, path: str | Path) -> EngineResult:
        """A ``result.json`` kept by ``--workdir``, to reuse a reference run."""
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class EvalReport:
    """What ``eval`` prints: the scores and what they were measured on."""

    recipe: str
    reference: str  # the source name
    reference_path: str
    prompts: int
    top_k: int
    scores: Scores
    weight_bytes: dict[str, int] = field(default_factory=dict)  # "recipe" / "reference"
    init_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "reference": {"source": self.reference, "path": self.reference_path},
            "prompts": self.prompts,
            "top_k": self.top_k,
            **self.scores.to_dict(),
            "weight_bytes": self.weight_bytes,
            "engine_init_s": self.init_s,
        }


def load_prompts(path: str | Path) -> list[Prompt]:
    """A text file (one prompt per line, blank lines ignored) or ``.jsonl``
    of ``{"prompt": text}`` / ``{"token_ids": [int, ...]}`` objects."""
    path = Path(path)
    fix = 'write one prompt per line, or a .jsonl of {"prompt": "..."} or {"token_ids": [...]} objects'
    if not path.is_file():
        raise MixedError(f"prompts file {path}: no such file; {fix}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MixedError(f"prompts file {path}: not UTF-8 text ({exc}); {fix}") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise MixedError(f"prompts file {path}: has no prompts (empty or only blank lines); {fix}")
    if path.suffix != ".jsonl":
        return [line for _, line in numbered]
    return [_jsonl_prompt(line, f"prompts file {path} line {n}", fix) for n, line in numbered]


def _jsonl_prompt(line: str, where: str, fix: str) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MixedError(f"{where}: not valid JSON ({exc.msg}); {fix}") from None
    keys = sorted({"prompt", "token_ids"} & set(obj)) if isinstance(obj, dict) else []
    if len(keys) != 1:
        raise MixedError(
            f"{where}: expected an object with exactly one of 'prompt', 'token_ids'; got {line.strip()[:80]!r}"
        )
    value = obj[keys[0]]
    if keys[0] == "prompt":
        if not isinstance(value, str) or not value.strip():
            raise MixedError(f"{where}: 'prompt' must be a non-empty string (got {value!r})")
        return value
    if not isinstance(value, list) or not value or not all(type(t) is int and t >= 0 for t in value):
        raise MixedError(f"{where}: 'token_ids' must be a non-empty list of non-negative integers (got {value!r})")
    return value


def reference_source(recipe: Recipe, against: str | None, where: str = "the recipe") -> str:
    """``against`` if given (it must be a source), else the first
    unquantized source in recipe order."""
    from vllm_mixed.formats import get_format
    from vllm_mixed.sources import Source

    names = ", ".join(sorted(recipe.sources))
    if against is not None:
        if against not in recipe.sources:
            raise MixedError(f"--against {against!r} is not a source of {where}; use one of: {names}")
        return against
    formats = {name: Source(name, path).format for name, path in recipe.sources.items()}
    for name, fmt in formats.items():
        if not get_format(fmt).quantized:
            return name
    shown = ", ".join(f"{n} ({f})" for n, f in sorted(formats.items()))
    raise MixedError(
        f"{where} has no unquantized source to compare with ({shown}); pass --against with one of: {names}"
    )


def reference_recipe(recipe: Recipe, name: str) -> Recipe:
    """The whole model from source ``name``, served the way the recipe is."""
    return recipe.only(name)


def run_engine(
    plan: LoadPlan, prompts: Sequence[Prompt], top_k: int, settings: EngineSettings, run_dir: Path
) -> EngineResult:
    """Compose ``plan`` under ``run_dir`` and score the prompts on it in a
    fresh vLLM process (``run_dir`` keeps model/, request.json, vllm.log and
    result.json)."""
    from vllm_mixed.compose import compose
    from vllm_mixed.evaluate_worker import OK_MARK
    from vllm_mixed.processes import run_isolated

    run_dir.mkdir(parents=True, exist_ok=True)
    model = compose(plan, run_dir / "model")
    request = {
        "model": str(model),
        "load_format": "mixed",
        "engine": settings.llm_kwargs(plan.recipe.dtype),
        "prompts": list(prompts),
        "top_k": top_k if top_k > 0 else -1,
    }
    req_path, out_path, log_path = run_dir / "request.json", run_dir / "result.json", run_dir / "vllm.log"
    req_path.write_text(json.dumps(request))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "vllm_mixed.evaluate_worker", str(req_path), str(out_path)]
    rc = run_isolated(cmd, log_path, settings.timeout_s, settings.env())
    if rc is None:
        raise MixedError(f"vLLM did not finish within {settings.timeout_s:.0f} s (see {log_path}); raise --timeout")
    log = log_path.read_text(errors="replace")
    if rc != 0 or OK_MARK not in log or not out_path.is_file():
        tail = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
        raise MixedError(f"vLLM failed in the {run_dir.name} run (exit status {rc}); the end of {log_path}:\n{tail}")
    data = json.loads(out_path.read_text())
    if "error" in data:
        raise MixedError(
            f"vLLM rejected the prompts in the {run_dir.name} run: {data['error']}; shorten them or raise --max-model-len "
            f"(now {settings.max_model_len})"
        )
    return EngineResult.from_json(data)


@contextmanager
def _workdir(path: str | Path | None) -> Iterator[Path]:
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="vllm-mixed-eval-") as tmp:
            yield Path(tmp)


def evaluate(
    recipe_path: str | Path,
    prompts: Sequence[Prompt],
    *,
    against: str | None = None,
    top_k: int = 20,
    settings: EngineSettings | None = None,
    workdir: str | Path | None = None,
    reference: EngineResult | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Run the reference and the recipe and score them (``top_k=0``: whole
    vocabulary, exact KL). ``reference`` reuses an earlier reference run
    (same prompts, top_k and settings) instead of starting one."""
    from vllm_mixed.eval_metrics import score_positions
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe

    settings = settings or EngineSettings()
    say = progress or (lambda _msg: None)
    recipe = load_recipe(recipe_path)
    name = reference_source(recipe, against, f"recipe {recipe_path}")
    plan = build_plan(recipe)
    ref_plan = build_plan(reference_recipe(recipe, name), plan.sources)
    vocab = int(plan.base.config.get("vocab_size") or 0)
    if not prompts:
        raise MixedError("no prompts to score; give at least one prompt")
    for n, p in enumerate(prompts, 1):
        if not isinstance(p, str) and vocab and (bad := [t for t in p if t >= vocab]):
            raise MixedError(f"prompt {n}: token ids {bad[:5]} are outside the vocabulary ({vocab} tokens) of the base")
    if vocab and top_k >= vocab:
        top_k = 0
    if top_k == 0 and vocab > LARGE_VOCAB:
        say(f"note: full-vocabulary logprobs of {vocab} tokens per position are slow and large; --top-k 20 is cheaper")
    with _workdir(workdir) as wd:
        if reference is None:
            say(f"eval: scoring {len(prompts)} prompts on the reference (source {name!r}) ...")
            reference = run_engine(ref_plan, prompts, top_k, settings, wd / "reference")
        say(f"eval: scoring {len(prompts)} prompts on the recipe {recipe_path} ...")
        result = run_engine(plan, prompts, top_k, settings, wd / "recipe")
    if reference.top_k != result.top_k or reference.prompt_token_ids != result.prompt_token_ids:
        raise MixedError(
            "the reference run scored other tokens (or another top-k) than the recipe run; "
            "reuse a reference only with the same prompts, --top-k and base tokenizer"
        )
    scores = score_positions(
        result.prompt_token_ids, reference.positions, result.positions, result.vocab_size, result.top_k
    )
    return EvalReport(
        recipe=str(recipe_path),
        reference=name,
        reference_path=recipe.sources[name],
        prompts=len(prompts),
        top_k=result.top_k,
        scores=scores,
        weight_bytes={"recipe": plan.total_bytes, "reference": ref_plan.total_bytes},
        init_s={"recipe": round(result.init_s, 2), "reference": round(reference.init_s, 2)},
    )
