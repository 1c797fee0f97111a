"""``make-tiny --trained`` and ``vllm-mixed fit`` on vLLM's CPU build.

The trained tiny model is made once per session (about a minute of training
on 2 cores). Its held-out text is never trained on and its perplexity there
is far below the vocabulary size. ``fit`` runs at budgets between the pure
sources (one through the command, with the plot and the hand recipe) over
one work directory, so each distinct composition starts one engine: the
reference, pure int4, pure fp8 and the two fitted recipes (the hand mix is
above the first budget: predicted only).
Each result's ``plan`` bytes are within its budget and its measured KL is at
most that of every pure source within the budget; a budget below the
smallest composition is refused naming the minimum."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from vllm_mixed.commands import fit as fit_command
from vllm_mixed.errors import MixedError
from vllm_mixed.evaluate import load_prompts
from vllm_mixed.fit import fit
from vllm_mixed.fit_measure import budget_table
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.training import TrainSettings, corpus_files, make_trained, read_text, split_files

PROMPTS = 16  # of heldout.txt's prompts: enough positions for stable KL, few for fast engine runs


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("trained") / "model"
    start = time.perf_counter()
    # local iteration only (CI trains the default): a copy of a model made by `make-tiny --trained`, or fewer steps
    made, steps = os.environ.get("VLLM_MIXED_TEST_TRAINED_DIR"), os.environ.get("VLLM_MIXED_TEST_TRAIN_STEPS")
    if made:
        shutil.copytree(made, root)
    else:
        make_trained(root, TrainSettings(steps=int(steps)) if steps else TrainSettings())
    return root, time.perf_counter() - start


@pytest.fixture(scope="session")
def fit_work(trained, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root, _ = trained
    work = tmp_path_factory.mktemp("fit")
    prompts = load_prompts(root / "heldout.txt")[:PROMPTS]
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    recipe = load_recipe(root / "recipe.yaml")
    table = budget_table(recipe, "bf16")
    pure = {s: table.pure_bytes(s) for s in table.sources}
    return {"root": root, "work": work, "prompts": prompts, "table": table, "pure": pure, "results": {}}


def test_trained_model_learned_heldout_text(trained):
    root, seconds = trained
    info = json.loads((root / "train.json").read_text())
    train_files, held_files = split_files(corpus_files())
    assert info["heldout_files"] == [f.name for f in held_files]
    assert not set(info["heldout_files"]) & set(info["training_files"])
    prompts = (root / "heldout.txt").read_text().splitlines()
    assert len(prompts) >= PROMPTS and all(p.strip() for p in prompts)
    train_text = read_text(train_files)
    assert not [p for p in prompts if p in train_text]  # no held-out line occurs in the training text
    assert info["loss_last10"] < info["loss_first"] - 2.0
    assert info["heldout_ppl_float32"] < info["vocab_size"] / 4, info  # uniform would be the vocabulary size
    print("TRAINED", json.dumps({k: info[k] for k in ("heldout_ppl_float32", "loss_first", "loss_last10",
                                                      "train_s", "total_s")}), f"fixture_s={seconds:.1f}")  # fmt: skip


def _check(result, budget: int, work: dict, out: Path) -> None:
    plan = build_plan(load_recipe(out))
    assert plan.total_bytes == result.chosen.nbytes <= budget
    fitting = [p for p in result.pure if p.nbytes <= budget]
    assert fitting, "the budgets are chosen above pure int4"
    for p in fitting:
        assert result.chosen.kl <= p.kl + 1e-12, (result.chosen, p)
    assert result.solver.nbytes <= budget


def test_fit_command_between_int4_and_fp8(fit_work, tmp_path):
    """The command at a budget above pure int4 and below pure fp8, with the
    plot; the hand recipe (mix A) is reported beside the pure sources."""
    pure = fit_work["pure"]
    assert pure["int4"] < pure["fp8"] < pure["bf16"]
    budget = pure["int4"] + (pure["fp8"] - pure["int4"]) // 3
    out, png = tmp_path / "fit.yaml", tmp_path / "front.png"
    parser = argparse.ArgumentParser()
    fit_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "fit", str(fit_work["root"] / "recipe.yaml"), "--budget", str(budget), "--prompts",
        str(fit_work["work"] / "prompts.txt"), "-o", str(out), "--plot", str(png), "--workdir", str(fit_work["work"]),
    ])  # fmt: skip
    buf, start = io.StringIO(), time.perf_counter()
    with redirect_stdout(buf):
        assert args.func(args) == 0
    text = buf.getvalue()
    print(text, f"\nFIT_CLI_S {time.perf_counter() - start:.1f}")
    assert f"wrote {out}" in text and "predicted KL" in text and "measured KL" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any("Pareto front" in line for line in header) and any("measured KL" in line for line in header)
    # the command's result, recomputed from the cached runs (no new engine run)
    result = fit(fit_work["root"] / "recipe.yaml", budget, fit_work["prompts"], workdir=fit_work["work"],
                 hand=[fit_work["root"] / "recipe.yaml"])  # fmt: skip
    assert result.engine_runs == 0
    assert result.recipe_text == out.read_text()
    _check(result, budget, fit_work, out)
    assert len(result.hand) == 1 and result.hand[0].nbytes > budget and result.hand[0].kl is None  # mix A: not run


def test_fit_between_fp8_and_bf16(fit_work, tmp_path):
    pure = fit_work["pure"]
    budget = pure["fp8"] + (pure["bf16"] - pure["fp8"]) // 4
    start = time.perf_counter()
    result = fit(fit_work["root"] / "recipe.yaml", budget, fit_work["prompts"], workdir=fit_work["work"])
    out = tmp_path / "fit.yaml"
    out.write_text(result.recipe_text)
    print(f"FIT {budget} chosen={result.chosen} solver={result.solver} pure={result.pure} "
          f"runs={result.engine_runs} s={time.perf_counter() - start:.1f}")  # fmt: skip
    _check(result, budget, fit_work, out)
    assert {p.name for p in result.pure} == {"pure fp8", "pure int4"}


def test_fit_budget_below_minimum_names_it(fit_work):
    least = fit_work["table"].minimum
    with pytest.raises(MixedError, match=rf"below the smallest composition.* {least} B"):
        fit(fit_work["root"] / "recipe.yaml", least - 1, fit_work["prompts"], workdir=fit_work["work"])
