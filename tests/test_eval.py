"""``vllm-mixed eval`` without vLLM: the KL / top-1 / perplexity maths on
synthetic logprob maps (top-K union approximation included), prompt files,
the choice of reference, and argument errors raised before any engine starts.
The runs on vLLM are in tests/e2e/test_eval.py."""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_mixed.commands import evaluate as eval_command
from vllm_mixed.errors import MixedError
from vllm_mixed.eval_metrics import position_kl, score_positions, top1
from vllm_mixed.evaluate import EngineResult, EngineSettings, load_prompts, reference_recipe, reference_source
from vllm_mixed.recipe import load_recipe, recipe_from_dict

ln = math.log


def dist(probs: dict[int, float]) -> dict[int, float]:
    return {t: ln(p) for t, p in probs.items()}


def full(probs: list[float]) -> dict[int, float]:
    return dist(dict(enumerate(probs)))


def exact_kl(p: list[float], q: list[float]) -> float:
    return sum(a * ln(a / b) for a, b in zip(p, q) if a > 0)


def log_softmax(x: list[float]) -> list[float]:
    m = max(x)
    s = ln(sum(math.exp(v - m) for v in x))
    return [v - m - s for v in x]


def truncate(d: dict[int, float], k: int, actual: int) -> dict[int, float]:
    """What vLLM returns with prompt_logprobs=k: the top-k plus the actual token."""
    out = dict(sorted(d.items(), key=lambda kv: -kv[1])[:k])
    out[actual] = d[actual]
    return out


# --- KL ---------------------------------------------------------------------


def test_kl_of_identical_distributions_is_exactly_zero() -> None:
    p = full([0.4, 0.3, 0.2, 0.1])
    assert position_kl(p, dict(p), 4) == 0.0
    top = truncate(p, 2, 3)
    assert position_kl(top, dict(top), 4, 2) == 0.0


def test_kl_full_vocabulary_is_exact() -> None:
    p, q = [0.5, 0.25, 0.15, 0.1], [0.3, 0.3, 0.3, 0.1]
    assert position_kl(full(p), full(q), 4) == pytest.approx(exact_kl(p, q), rel=1e-12)
    assert position_kl(full(q), full(p), 4) == pytest.approx(exact_kl(q, p), rel=1e-12)


def test_kl_full_vocabulary_renormalizes_float32_sums() -> None:
    """vLLM's float32 log-softmax sums to 1 only within ~1e-7; KL stays >= 0."""
    p = {t: lp + 3e-7 for t, lp in full([0.25, 0.25, 0.25, 0.25]).items()}
    q = {t: lp - 2e-7 for t, lp in full([0.25, 0.25, 0.25, 0.25]).items()}
    assert position_kl(p, q, 4) == pytest.approx(0.0, abs=1e-15)


def test_kl_top_k_same_sets_lumps_the_tail() -> None:
    """Both top-2 are {0, 1}: KL over {0, 1, other} (other = 0.2 on both)."""
    p, q = [0.5, 0.3, 0.15, 0.05], [0.3, 0.5, 0.05, 0.15]
    approx = position_kl(dist({0: 0.5, 1: 0.3}), dist({1: 0.5, 0: 0.3}), 4, 2)
    assert approx == pytest.approx(0.5 * ln(0.5 / 0.3) + 0.3 * ln(0.3 / 0.5), rel=1e-12)
    assert approx <= exact_kl(p, q)  # lumping the tail can only lower it


def test_kl_top_k_union_estimates_missing_tokens() -> None:
    """Token 2 is in q's top-2 only, token 1 in p's only. Each side gives its
    missing token min(K-th probability, leftover / (missing + 1)) and keeps
    the rest of its leftover as 'other' (tokens 3 and 4)."""
    p = dist({0: 0.5, 1: 0.3})  # leftover 0.2 -> token 2: min(0.3, 0.2/2) = 0.1, other 0.1
    q = dist({0: 0.4, 2: 0.35})  # leftover 0.25 -> token 1: min(0.35, 0.25/2) = 0.125, other 0.125
    expected = 0.5 * ln(0.5 / 0.4) + 0.3 * ln(0.3 / 0.125) + 0.1 * ln(0.1 / 0.35) + 0.1 * ln(0.1 / 0.125)
    assert position_kl(p, q, 5, 2) == pytest.approx(expected, rel=1e-12)


def test_kl_top_k_caps_missing_tokens_at_the_kth_probability() -> None:
    """With a large leftover, a missing token gets the K-th probability (its
    rank is below K), not an even share; the actual token (outside the top-K,
    present on both sides) is not the K-th."""
    p = dist({0: 0.3, 1: 0.1, 9: 0.01})  # 9: the actual token, outside p's top-2
    q = dist({0: 0.3, 2: 0.1, 9: 0.02})
    v = 100
    pb = {0: 0.3, 1: 0.1, 2: 0.1, 9: 0.01}
    qb = {0: 0.3, 1: 0.1, 2: 0.1, 9: 0.02}
    po, qo = 1 - sum(pb.values()), 1 - sum(qb.values())
    expected = sum(pb[t] * ln(pb[t] / qb[t]) for t in pb) + po * ln(po / qo)
    assert position_kl(p, q, v, 2) == pytest.approx(expected, rel=1e-12)


def test_kl_top_k_stays_finite_when_the_top_k_holds_all_the_mass() -> None:
    p = dist({0: 0.7, 1: 0.3})  # leftover 0: floored, so q's missing token is not 0
    q = dist({0: 0.6, 2: 0.4})
    kl = position_kl(p, q, 10, 2)
    assert math.isfinite(kl) and kl > 1.0


def test_kl_top_k_union_is_close_for_peaked_distributions() -> None:
    """On LLM-like peaked distributions (top-20 holds ~90% of the mass) the
    top-20 union approximation is within 15% of the exact KL."""
    rng = random.Random(0)
    vocab, exact, approx = 1000, 0.0, 0.0
    for _ in range(40):
        a = [5 * rng.gauss(0, 1) for _ in range(vocab)]
        b = [x + 0.5 * rng.gauss(0, 1) for x in a]
        p, q = dict(enumerate(log_softmax(a))), dict(enumerate(log_softmax(b)))
        actual = rng.randrange(vocab)
        exact += position_kl(p, q, vocab)
        approx += position_kl(truncate(p, 20, actual), truncate(q, 20, actual), vocab, 20)
    assert 0.85 * exact < approx < 1.05 * exact


# --- top-1 and perplexity -----------------------------------------------------


def test_top1_breaks_ties_by_lower_token_id() -> None:
    assert top1({5: -1.0, 3: -1.0, 7: -2.0}) == 3


def test_score_positions_top1_perplexity_and_method() -> None:
    ids = [[1, 2, 3], [4, 0]]  # positions score tokens 2, 3 and 0
    ref = [[full([0.1, 0.1, 0.6, 0.1, 0.1]), full([0.2, 0.2, 0.2, 0.3, 0.1])], [full([0.5, 0.2, 0.1, 0.1, 0.1])]]
    rec = [[full([0.1, 0.1, 0.5, 0.2, 0.1]), full([0.4, 0.1, 0.1, 0.3, 0.1])], [full([0.5, 0.2, 0.1, 0.1, 0.1])]]
    s = score_positions(ids, ref, rec, vocab_size=5, top_k=0)
    assert s.positions == 3
    assert s.top1_agree == 2 and s.top1_agreement == pytest.approx(2 / 3)  # position 2: 3 vs 0
    assert s.ppl_reference == pytest.approx(math.exp(-(ln(0.6) + ln(0.3) + ln(0.5)) / 3))
    assert s.ppl_recipe == pytest.approx(math.exp(-(ln(0.5) + ln(0.3) + ln(0.5)) / 3))
    assert s.ppl_delta == pytest.approx(s.ppl_recipe - s.ppl_reference)
    kls = [
        exact_kl([0.1, 0.1, 0.6, 0.1, 0.1], [0.1, 0.1, 0.5, 0.2, 0.1]),
        exact_kl([0.2, 0.2, 0.2, 0.3, 0.1], [0.4, 0.1, 0.1, 0.3, 0.1]),
        0.0,
    ]
    assert s.kl_mean == pytest.approx(sum(kls) / 3, rel=1e-12)
    assert s.kl_max == pytest.approx(max(kls), rel=1e-12)
    assert s.kl_method.startswith("exact")
    truncated = [[truncate(d, 2, ids[n][i + 1]) for i, d in enumerate(rows)] for n, rows in enumerate(ref)]
    approx = score_positions(ids, truncated, truncated, vocab_size=5, top_k=2)
    assert approx.kl_mean == 0.0 and approx.ppl_delta == 0.0
    assert approx.kl_method.startswith("approximate: union of both top-2 sets")


def test_score_positions_needs_two_tokens() -> None:
    with pytest.raises(MixedError, match="every prompt is a single token"):
        score_positions([[5], [6]], [[], []], [[], []], vocab_size=10, top_k=0)


def test_engine_result_from_worker_json() -> None:
    data = {
        "prompt_token_ids": [[1, 2]],
        "positions": [[{"ids": [2, 0], "logprobs": [-0.1, -2.5]}]],
        "vocab_size": 3,
        "top_k": -1,
        "init_s": 1.5,
    }
    r = EngineResult.from_json(json.loads(json.dumps(data)))
    assert r.positions == [[{2: -0.1, 0: -2.5}]] and r.top_k == 0 and r.vocab_size == 3


# --- prompts ----------------------------------------------------------------------


def test_prompts_text_file_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("Hello there.\n\n   \nThe capital of France is\n")
    assert load_prompts(f) == ["Hello there.", "The capital of France is"]


def test_prompts_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Hi there"}\n\n{"token_ids": [5, 6, 7], "id": "x"}\n')
    assert load_prompts(f) == ["Hi there", [5, 6, 7]]


@pytest.mark.parametrize(
    "body, message",
    [
        ("", "has no prompts"),
        ("\n  \n", "has no prompts"),
        ("{nope\n", "line 1: not valid JSON"),
        ('{"text": "x"}\n', "line 1: expected an object with exactly one of 'prompt', 'token_ids'"),
        ('{"prompt": "a", "token_ids": [1]}\n', "exactly one of"),
        ('{"prompt": "ok"}\n{"token_ids": [1, -2]}\n', "line 2: 'token_ids' must be a non-empty list"),
        ('{"token_ids": []}\n', "'token_ids' must be a non-empty list"),
        ('{"prompt": ""}\n', "'prompt' must be a non-empty string"),
    ],
)
def test_prompts_errors(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(body)
    with pytest.raises(MixedError, match=re.escape(message)):
        load_prompts(f)


def test_prompts_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MixedError, match=r"prompts file .*nope\.txt: no such file; write one prompt per line"):
        load_prompts(tmp_path / "nope.txt")


# --- the reference ----------------------------------------------------------------


def test_reference_is_the_first_unquantized_source(tiny_ro) -> None:
    recipe = load_recipe(tiny_ro.recipe_path)  # sources: bf16, fp8, int4
    assert reference_source(recipe, None) == "bf16"
    assert reference_source(recipe, "fp8") == "fp8"
    data = tiny_ro.recipe_data()
    data["sources"] = {"int4": "gptq-int4", "fp8": "fp8", "b": "bf16", "a": "bf16"}
    data.update(base="a", default="a", rules=[])
    assert reference_source(recipe_from_dict(data, tiny_ro.recipe_path), None) == "b"  # recipe order, not sorted


def test_reference_unknown_against_lists_the_sources(tiny_ro) -> None:
    recipe = load_recipe(tiny_ro.recipe_path)
    with pytest.raises(
        MixedError, match=r"--against 'bf17' is not a source of the recipe; use one of: bf16, fp8, int4"
    ):
        reference_source(recipe, "bf17")


def test_reference_none_unquantized(tiny_ro) -> None:
    data = tiny_ro.recipe_data()
    data.update(sources={"fp8": "fp8", "int4": "gptq-int4"}, base="fp8", default="fp8", rules=[])
    recipe = recipe_from_dict(data, tiny_ro.recipe_path)
    with pytest.raises(MixedError, match=r"no unquantized source .*fp8 \(fp8_block\), int4 \(gptq_int4\).*--against"):
        reference_source(recipe, None)


def test_reference_recipe_is_pure_with_the_recipes_base(tiny_ro) -> None:
    recipe = load_recipe(tiny_ro.recipe(base="fp8"))
    ref = reference_recipe(recipe, "bf16")
    assert (ref.default, ref.rules, ref.base, ref.dtype) == ("bf16", [], "fp8", recipe.dtype)
    assert ref.sources == recipe.sources


# --- the command, up to the engine start ----------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_arguments_defaults() -> None:
    args = parse("r.yaml", "--prompts", "p.txt")
    assert (args.top_k, args.max_model_len, args.gpu_memory_utilization, args.json, args.against) == (
        20, 512, 0.3, False, None,
    )  # fmt: skip
    assert args.func.__name__ == "cmd_eval"
    with pytest.raises(SystemExit):
        parse("r.yaml", "--prompts", "p.txt", "--top-k", "-1")


def test_cmd_eval_bad_input_fails_before_any_engine(tiny_ro, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    args = parse(str(tiny_ro.recipe_path), "--prompts", str(prompts), "--against", "nope")
    with pytest.raises(MixedError, match="--against 'nope' is not a source of recipe .*; use one of: bf16, fp8, int4"):
        args.func(args)
    args = parse(str(tiny_ro.recipe_path), "--prompts", str(tmp_path / "missing.txt"))
    with pytest.raises(MixedError, match="missing.txt: no such file"):
        args.func(args)
    ids = tmp_path / "p.jsonl"
    ids.write_text('{"token_ids": [1, 2, 5000]}\n')
    args = parse(str(tiny_ro.recipe_path), "--prompts", str(ids))
    with pytest.raises(MixedError, match=r"prompt 1: token ids \[5000\] are outside the vocabulary \(1024 tokens\)"):
        args.func(args)


def test_engine_settings_in_process_for_one_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    one, two = EngineSettings(), EngineSettings(tensor_parallel_size=2)
    assert one.llm_kwargs("bfloat16")["distributed_executor_backend"] == "uni"
    assert one.env()["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "distributed_executor_backend" not in two.llm_kwargs("bfloat16")
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in two.env()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    assert one.env()["VLLM_CPU_KVCACHE_SPACE"] == "8"  # the user's setting wins


def test_import_is_light() -> None:
    """The CLI imports this module: no vLLM, torch or pydantic at import."""
    code = (
        "import sys, vllm_mixed.evaluate, vllm_mixed.eval_metrics; "
        "print(sorted(m for m in ('vllm', 'torch', 'pydantic', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
