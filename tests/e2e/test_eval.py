"""``vllm-mixed eval`` on vLLM's CPU build and the tiny model: all-bf16 against
its own source scores exactly zero; the four recipes give finite numbers and
the quantized ones a positive KL. One reference run (bf16, full vocabulary)
is shared by the session: five engine starts in all.

Each recipe prints one line ``EVAL {json}``; ``kl_top20_approx`` is the KL
the default ``--top-k 20`` approximation would report on the same logprobs."""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from tests.e2e.conftest import write_recipe
from vllm_mixed.commands import evaluate as eval_command
from vllm_mixed.eval_metrics import score_positions
from vllm_mixed.evaluate import EngineResult, evaluate, load_prompts

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! The capital of France is Paris.",
    "Once upon a time there was a small model that learned to count.",
    "The sun rises in the east and sets in the west.",
]
NUMBERS = ("kl_mean", "kl_max", "top1_agreement", "ppl_recipe", "ppl_reference", "ppl_delta")


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    return root


@pytest.fixture(scope="session")
def bf16_eval(tiny_dirs: Path, eval_dir: Path) -> tuple[dict, EngineResult, float]:
    """The whole command on all-bf16 (a reference run and a recipe run) with
    --json; its kept reference run is shared by the other recipes."""
    parser = argparse.ArgumentParser()
    eval_command.add_parser(parser.add_subparsers(dest="command", required=True))
    recipe = write_recipe(tiny_dirs, "all-bf16", eval_dir)
    argv = ["eval", str(recipe), "--prompts", str(eval_dir / "prompts.txt"), "--top-k", "0", "--json"]
    args = parser.parse_args([*argv, "--workdir", str(eval_dir / "all-bf16")])
    out, start = io.StringIO(), time.perf_counter()
    with redirect_stdout(out):
        assert args.func(args) == 0
    elapsed = time.perf_counter() - start
    reference = EngineResult.load(eval_dir / "all-bf16" / "reference" / "result.json")
    return json.loads(out.getvalue()), reference, elapsed


def top20_kl(reference: EngineResult, result: EngineResult) -> float:
    """The mean KL that --top-k 20 would give: the same runs cut to what vLLM
    returns for prompt_logprobs=20 (the top 20 plus the actual token)."""

    def cut(run: EngineResult) -> list[list[dict[int, float]]]:
        return [
            [
                {**dict(sorted(d.items(), key=lambda kv: -kv[1])[:20]), ids[i + 1]: d[ids[i + 1]]}
                for i, d in enumerate(rows)
            ]
            for ids, rows in zip(run.prompt_token_ids, run.positions)
        ]

    return score_positions(result.prompt_token_ids, cut(reference), cut(result), result.vocab_size, 20).kl_mean


def show(name: str, report: dict, approx: float, seconds: float) -> dict:
    summary = {"recipe": name, **{k: report[k] for k in NUMBERS}, "positions": report["positions"]}
    summary.update(kl_top20_approx=approx, kl_method=report["kl_method"].split(":")[0], eval_s=round(seconds, 1))
    summary["engine_init_s"] = report["engine_init_s"]
    print("EVAL", json.dumps(summary))
    return summary


def test_all_bf16_against_its_source_is_exactly_zero(bf16_eval, eval_dir: Path) -> None:
    report, reference, seconds = bf16_eval
    result = EngineResult.load(eval_dir / "all-bf16" / "recipe" / "result.json")
    show("all-bf16", report, top20_kl(reference, result), seconds)
    assert report["reference"]["source"] == "bf16" and report["top_k"] == 0
    assert report["kl_method"].startswith("exact: full distributions over the vocabulary (1024 tokens)")
    assert report["prompts"] == 4 and report["positions"] == sum(len(ids) - 1 for ids in reference.prompt_token_ids)
    assert report["kl_mean"] < 1e-9 and report["kl_max"] < 1e-9
    assert report["top1_agreement"] == 1.0
    assert report["ppl_delta"] == 0.0 and report["ppl_recipe"] == report["ppl_reference"]
    assert result.positions == reference.positions  # two engine runs, identical logprobs


@pytest.mark.parametrize("name", ["all-fp8", "all-int4", "mix"])
def test_recipe_against_bf16(name: str, bf16_eval, tiny_dirs: Path, tmp_path: Path) -> None:
    _, reference, _ = bf16_eval
    recipe = write_recipe(tiny_dirs, name, tmp_path)
    if name == "mix":  # token ids as a .jsonl: the same tokens as the text prompts
        prompts_path = tmp_path / "prompts.jsonl"
        prompts_path.write_text("".join(json.dumps({"token_ids": ids}) + "\n" for ids in reference.prompt_token_ids))
    else:
        prompts_path = tmp_path / "prompts.txt"
        prompts_path.write_text("\n".join(PROMPTS) + "\n")
    start = time.perf_counter()
    report = evaluate(recipe, load_prompts(prompts_path), top_k=0, reference=reference, workdir=tmp_path).to_dict()
    result = EngineResult.load(tmp_path / "recipe" / "result.json")
    summary = show(name, report, top20_kl(reference, result), time.perf_counter() - start)
    assert all(math.isfinite(summary[k]) for k in (*NUMBERS, "kl_top20_approx")), summary
    assert report["kl_mean"] > 0 and report["kl_max"] >= report["kl_mean"], summary
    assert 0.0 <= report["top1_agreement"] <= 1.0
    assert report["ppl_reference"] == pytest.approx(show_ppl(reference))


def show_ppl(run: EngineResult) -> float:
    """Perplexity straight from the kept reference logprobs."""
    nll = [-d[ids[i + 1]] for ids, rows in zip(run.prompt_token_ids, run.positions) for i, d in enumerate(rows)]
    return math.exp(sum(nll) / len(nll))
