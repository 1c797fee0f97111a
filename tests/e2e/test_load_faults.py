"""A source shard damaged after ``compose`` ends the engine start with a
message naming the file: no model is served half-loaded."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import run_vllm, write_recipe
from vllm_mixed.compose import compose
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe


def _break(shard, how):
    if how == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 4096])
    else:
        shard.unlink()


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_damaged_shard_fails_engine_start(how, tiny_dirs, tmp_path):
    import shutil

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_dirs, copy)
    composed = compose(build_plan(load_recipe(write_recipe(copy, "mix", tmp_path))), tmp_path / "mix")
    shard = sorted((copy / "gptq-int4").glob("model-*.safetensors"))[-1]
    _break(shard, how)
    with pytest.raises(AssertionError) as failed:
        run_vllm(composed, "mixed", {"greedy": [[1, 2, 3]], "max_tokens": 2}, tmp_path)
    assert "vLLM run failed" in str(failed.value)
    log = (tmp_path / "vllm.log").read_text()
    error = next(line for line in log.splitlines() if "MixedError:" in line)
    assert shard.name in error and str(shard.parent) in error
    assert ("truncated: tensor" in error) if how == "truncated" else ("download the missing shard" in error)
    assert "RUNNER_OK" not in log and not (tmp_path / "result.json").exists()
