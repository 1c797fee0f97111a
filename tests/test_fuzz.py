"""Property-based fuzzing of the two parsers that read untrusted input: the
recipe (YAML / plain data) and the safetensors header / shard index.

Whatever the input, the only failure allowed is the project's own
:class:`MixedError`; a forged header must never make the reader allocate what
it claims. CI runs a small sample; ``make fuzz`` runs 10,000+ examples each
(``HYPOTHESIS_PROFILE=fuzz``)."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from vllm_mixed.errors import MixedError
from vllm_mixed.recipe import Recipe, load_recipe, recipe_from_dict
from vllm_mixed.safetensors_header import read_header
from vllm_mixed.sources import Source

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

KEYS = ["sources", "base", "default", "dtype", "rules", "targets", "source", "extra", ""]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.sampled_from(["bf16", "int4", "re:(", "re:.*", "model.layers.*.mlp.experts", "bfloat16", "/nonexistent"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@given(data=st.dictionaries(st.sampled_from(KEYS), values, max_size=6) | values)
def test_recipe_data_fails_only_with_mixed_error(data):
    try:
        assert isinstance(recipe_from_dict(data), Recipe)
    except MixedError as exc:
        assert str(exc).startswith("recipe")


@given(
    text=st.text(max_size=300)
    | st.builds(lambda d: yaml.safe_dump(d), st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
)
def test_recipe_files_fail_only_with_mixed_error(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("r") / "recipe.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except MixedError as exc:
        assert str(path) in str(exc)


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("s") / "model.safetensors"
    save_file(
        {
            "a.weight": torch.randn(16, 8).to(torch.bfloat16),
            "b.qweight": torch.randint(0, 9, (4, 8), dtype=torch.int32),
        },
        str(path),
    )
    return path.read_bytes()


def _mutate(raw: bytes, data) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "length", "header"]))
    if kind == "flip":
        buf = bytearray(raw)
        for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            buf[pos] = data.draw(st.integers(0, 255))
        return bytes(buf)
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if kind == "length":  # forge the header length
        return struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
    # forge header entries: huge shapes / offsets / odd dtypes, valid JSON
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = data.draw(st.sampled_from(sorted(header)))
    entry = header[name]
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry"]))
    forged = data.draw(
        st.one_of(
            st.lists(st.integers(-(2**63), 2**64), max_size=4), st.text(max_size=6), st.none(),
            st.sampled_from([[2**40, 2**40], [0, 2**62], "F8_E4M3", "I32", {"x": 1}]),
        )
    )  # fmt: skip
    if field == "entry":
        header[name] = forged
    elif isinstance(entry, dict):
        entry[field] = forged
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + raw[8 + n :]


@given(data=st.data())
def test_safetensors_header_fails_only_with_mixed_error(data, shard, tmp_path_factory):
    path = tmp_path_factory.mktemp("h") / "model.safetensors"
    path.write_bytes(_mutate(shard, data))
    tracemalloc.start()
    try:
        infos = read_header(path)
        size = path.stat().st_size
        assert all(0 <= t.start <= t.end <= size for t in infos.values())
    except MixedError as exc:
        assert str(path) in str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"reading a {path.stat().st_size}-byte file allocated {peak} bytes"


@given(
    index=st.one_of(
        st.text(max_size=200),
        st.builds(json.dumps, values),
        st.builds(json.dumps, st.fixed_dictionaries({"weight_map": values})),
    )
)
def test_shard_index_fails_only_with_mixed_error(index, tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))
    (d / "model.safetensors.index.json").write_text(index)
    try:
        src = Source("s", d)
        for name in list(src.weight_map)[:3]:
            src.tensor(name)
    except MixedError as exc:
        assert str(Path(d)) in str(exc)


@pytest.mark.parametrize(
    "body", [b"[" * 100_000, b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}']
)
def test_header_json_edge_cases(body, tmp_path):
    """Deep nesting (RecursionError) and over-long integers (ValueError) in
    a header are bad files, not crashes."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(MixedError, match="not valid JSON"):
        read_header(path)
