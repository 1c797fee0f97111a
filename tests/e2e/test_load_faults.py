"""A source shard damaged or replaced after ``compose`` ends the engine start
with a message naming the file (and the tensor, where one is at fault): no
model is served half-loaded or from weights compose did not plan."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from safetensors.torch import load_file, save_file

from tests.e2e.conftest import run_vllm, write_recipe
from vllm_mixed.compose import compose
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe

QWEIGHT = "model.layers.1.mlp.experts.{}.up_proj.qweight"


def _swap_offsets(shard, a, b):
    """Two same-shaped tensors trade places in the header only: a valid
    file of the same size that plans fine, with other weights."""
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode()
    data[8 : 8 + n] = text + b" " * (n - len(text))
    shard.write_bytes(bytes(data))


def _break(copy, shard, how):
    """Damage or replace ``shard``; returns what the engine's error must say."""
    if how == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 4096])
        return ["truncated: tensor"]
    if how == "deleted":
        shard.unlink()
        return ["the file is missing", "download the missing shard"]
    if how == "replaced-other-source":  # a BF16 shard where a GPTQ one was
        shutil.copyfile(sorted((copy / "bf16").glob("model-*.safetensors"))[0], shard)
        return ["replaced or modified since `vllm-mixed compose`", "the index lists tensor 'model.layers."]
    if how == "replaced-reshaped":  # re-exported with one tensor of another shape
        tensors = load_file(shard)
        name = next(n for n in tensors if n.endswith(".qweight"))
        tensors[name] = tensors[name][:-1].clone()
        save_file(tensors, shard, metadata={"format": "pt"})
        return ["replaced or modified since `vllm-mixed compose`", f"tensor {name!r} has shape ["]
    _swap_offsets(shard, QWEIGHT.format(0), QWEIGHT.format(1))  # only the recorded identity sees this
    return ["replaced or modified since `vllm-mixed compose`", "its safetensors header changed"]


@pytest.mark.parametrize(
    "how", ["truncated", "deleted", "replaced-other-source", "replaced-reshaped", "replaced-swapped-offsets"]
)
def test_damaged_shard_fails_engine_start(how, tiny_dirs, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_dirs, copy)
    composed = compose(build_plan(load_recipe(write_recipe(copy, "mix", tmp_path))), tmp_path / "mix")
    index = json.loads((copy / "gptq-int4" / "model.safetensors.index.json").read_text())
    shard = copy / "gptq-int4" / index["weight_map"][QWEIGHT.format(0)]
    expected = _break(copy, shard, how)
    with pytest.raises(AssertionError) as failed:
        run_vllm(composed, "mixed", {"greedy": [[1, 2, 3]], "max_tokens": 2}, tmp_path)
    assert "vLLM run failed" in str(failed.value)
    log = (tmp_path / "vllm.log").read_text()
    error = next(line for line in log.splitlines() if "MixedError:" in line)
    assert shard.name in error and str(shard.parent) in error
    for part in expected:
        assert part in error, error
    assert "replaced or modified since `vllm-mixed compose`" in error and "re-run `vllm-mixed compose" in error
    assert "RUNNER_OK" not in log and not (tmp_path / "result.json").exists()
