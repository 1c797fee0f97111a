"""A checkpoint directory: format detection from its config.json, the tensor
map from the index or a single ``model.safetensors``, and refusals."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_mixed.errors import MixedError
from vllm_mixed.formats import detect_format
from vllm_mixed.formats.fp8_block import FP8_QUANT_CONFIG
from vllm_mixed.formats.gptq_int4 import GPTQ_QUANT_CONFIG
from vllm_mixed.plan import build_plan, pure_plan
from vllm_mixed.recipe import recipe_from_dict
from vllm_mixed.sources import Source

# --- format detection ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt,expected", [("bf16", "unquantized"), ("fp8", "fp8_block"), ("gptq-int4", "gptq_int4")])
def test_format_detected_from_config(tiny_master: Path, fmt: str, expected: str) -> None:
    src = Source("s", tiny_master / fmt)
    assert src.format == expected
    config = json.loads((tiny_master / fmt / "config.json").read_text())
    assert src.config == config
    assert src.quant_config == config.get("quantization_config")


def test_format_follows_config_not_directory_name(tiny: Any) -> None:
    """Swap the configs of two directories: the detected formats swap too."""
    fp8_cfg = (tiny.src("fp8") / "config.json").read_text()
    (tiny.src("fp8") / "config.json").write_text((tiny.src("int4") / "config.json").read_text())
    (tiny.src("int4") / "config.json").write_text(fp8_cfg)
    assert Source("a", tiny.src("fp8")).format == "gptq_int4"
    assert Source("b", tiny.src("int4")).format == "fp8_block"


@pytest.mark.parametrize(
    "qc,expected",
    [
        (None, "unquantized"),
        ({}, "unquantized"),
        (FP8_QUANT_CONFIG, "fp8_block"),
        ({**FP8_QUANT_CONFIG, "weight_block_size": [64, 32]}, "fp8_block"),
        ({**FP8_QUANT_CONFIG, "quant_method": "FP8"}, "fp8_block"),
        (GPTQ_QUANT_CONFIG, "gptq_int4"),
        ({**GPTQ_QUANT_CONFIG, "quant_method": "gptq_marlin"}, "gptq_int4"),
        ({**GPTQ_QUANT_CONFIG, "sym": False, "group_size": 32}, "gptq_int4"),
    ],
)
def test_detect_format_accepts(qc: dict[str, Any] | None, expected: str) -> None:
    assert detect_format(qc, "here") == expected


@pytest.mark.parametrize(
    "qc,expected",
    [
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "per-tensor FP8 is not supported"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "per-tensor FP8 is not supported"),
        ({**FP8_QUANT_CONFIG, "weight_block_size": [128]}, "fp8 checkpoint without weight_block_size [n, k]"),
        (
            {**FP8_QUANT_CONFIG, "activation_scheme": "static"},
            "block FP8 needs activation_scheme 'dynamic', got 'static'",
        ),
        ({**GPTQ_QUANT_CONFIG, "bits": 3}, "bits=3 (4 and 8 are supported"),
        (
            {**GPTQ_QUANT_CONFIG, "checkpoint_format": "gptq_v2"},
            "checkpoint_format='gptq_v2' (only the v1 'gptq' layout)",
        ),
        ({**GPTQ_QUANT_CONFIG, "group_size": 0}, "group_size=0 (needs a positive group size such as 128, or -1"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version='gemv' (only AutoAWQ's 'gemm' packing"),
        ({"quant_method": "compressed-tensors"}, "unsupported compressed-tensors checkpoint: it has no config_groups"),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "int-quantized",
                "config_groups": {
                    "g": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
                    }
                },
            },
            "its scheme is int-quantized: weights int8 channel, input activations int8 token dynamic",
        ),
    ],
)
def test_detect_format_refuses(qc: dict[str, Any], expected: str) -> None:
    with pytest.raises(MixedError) as exc:
        detect_format(qc, "source 'x' (/m) config.json")
    msg = str(exc.value)
    assert msg.startswith("source 'x' (/m) config.json: ")
    assert expected in msg


def test_gptq_refusal_lists_every_problem() -> None:
    with pytest.raises(MixedError) as exc:
        detect_format({**GPTQ_QUANT_CONFIG, "bits": 2, "checkpoint_format": "gptq_v2"}, "here")
    assert "bits=2" in str(exc.value) and "checkpoint_format='gptq_v2'" in str(exc.value)


def test_unknown_method_lists_supported() -> None:
    with pytest.raises(MixedError) as exc:
        detect_format({"quant_method": "bitsandbytes"}, "here")
    assert "supported: none (unquantized), fp8 with weight_block_size, gptq (4-bit)" in str(exc.value)


def test_source_refuses_config_format(tiny: Any) -> None:
    tiny.set_config("fp8", quantization_config={"quant_method": "fp8", "activation_scheme": "static"})
    with pytest.raises(MixedError) as exc:
        Source("fp8", tiny.src("fp8"))
    assert f"source 'fp8' ({tiny.src('fp8')}) config.json: " in str(exc.value)


def test_quantization_config_not_an_object(tiny: Any) -> None:
    tiny.set_config("fp8", quantization_config="fp8")
    with pytest.raises(MixedError) as exc:
        Source("fp8", tiny.src("fp8"))
    assert f"{tiny.src('fp8') / 'config.json'}: quantization_config is 'fp8', not an object" in str(exc.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff"])
def test_config_not_json_object(tiny: Any, text: str) -> None:
    (tiny.src("bf16") / "config.json").write_text(text)
    with pytest.raises(MixedError) as exc:
        Source("bf16", tiny.src("bf16"))
    msg = str(exc.value)
    assert str(tiny.src("bf16") / "config.json") in msg
    assert "restore the checkpoint's config.json" in msg


def test_dtype_from_config(tiny_master: Path) -> None:
    assert Source("a", tiny_master / "bf16").dtype == "bfloat16"
    assert Source("b", tiny_master / "gptq-int4").dtype == "float16"


# --- tensor map ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "gptq-int4"])
def test_weight_map_and_headers_from_index(tiny_master: Path, header_len: Any, fmt: str) -> None:
    root = tiny_master / fmt
    src = Source("s", root)
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n: p.name for n, p in src.weight_map.items()} == index
    for shard in sorted(root.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                info = src.tensor(name)
                assert info.file == shard
                assert info.dtype == f.get_slice(name).get_dtype()
                assert list(info.shape) == f.get_slice(name).get_shape()
    expected = sum(s.stat().st_size - 8 - header_len(s) for s in root.glob("*.safetensors"))
    assert src.total_bytes() == expected


def test_single_file_without_index(tiny: Any, tmp_path: Path, header_len: Any) -> None:
    """All bf16 tensors merged into one ``model.safetensors``: the same facts,
    and a full plan from it."""
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tiny.src("bf16") / "config.json", single)
    merged: dict[str, torch.Tensor] = {}
    for shard in tiny.shards("bf16"):
        merged.update(load_file(shard))
    save_file(merged, str(single / "model.safetensors"), metadata={"format": "pt"})
    src = Source("one", single)
    assert set(src.weight_map) == set(merged)
    assert set(src.weight_map.values()) == {single / "model.safetensors"}
    for name, t in merged.items():
        info = src.tensor(name)
        assert list(info.shape) == list(t.shape) and info.nbytes == t.numel() * t.element_size()
    path = single / "model.safetensors"
    assert src.total_bytes() == path.stat().st_size - 8 - header_len(path)

    recipe = recipe_from_dict(
        {"sources": {"one": str(single), "bf16": str(tiny.src("bf16"))}, "base": "one", "default": "one"}
    )
    sources = {"one": src, "bf16": Source("bf16", tiny.src("bf16"))}
    plan = build_plan(recipe, sources)
    assert plan.total_bytes == src.total_bytes() == pure_plan(recipe, sources, "bf16").total_bytes
    assert {t.name for p in plan.layers for t in p.tensors} == set(merged)


def test_index_wins_over_single_file(tiny: Any) -> None:
    root = tiny.src("bf16")
    save_file({"stray": torch.randn(2)}, str(root / "model.safetensors"))
    assert "stray" not in Source("s", root).weight_map


def test_tensor_in_no_shard(tiny_master: Path) -> None:
    src = Source("bf16", tiny_master / "bf16")
    assert not src.has("model.layers.9.mlp.gate.weight")
    with pytest.raises(MixedError) as exc:
        src.tensor("model.layers.9.mlp.gate.weight")
    msg = str(exc.value)
    assert f"source 'bf16' ({tiny_master / 'bf16'})" in msg
    assert "tensor 'model.layers.9.mlp.gate.weight' is in no shard" in msg


def test_stale_index(tiny: Any) -> None:
    """The index names a shard whose header lacks the tensor."""
    name = "model.layers.0.mlp.gate.weight"
    other = next(s for s in tiny.shards("bf16") if s != tiny.shard_of("bf16", name))
    index = tiny.index("bf16")
    index["weight_map"][name] = other.name
    (tiny.src("bf16") / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MixedError) as exc:
        Source("bf16", tiny.src("bf16")).tensor(name)
    msg = str(exc.value)
    assert f"{other}: the index lists tensor {name!r} in this shard but its header does not" in msg
    assert "regenerate it" in msg


@pytest.mark.parametrize(
    "text,expected",
    [
        ("{oops", "not a valid safetensors index"),
        ('{"metadata": {}}', "not a valid safetensors index"),
        ('{"weight_map": [1]}', "weight_map must map tensor names to shard file names"),
        ('{"weight_map": {"a": 1, "b": "x.safetensors"}}', "weight_map must map tensor names to shard file names"),
    ],
)
def test_invalid_index(tiny: Any, text: str, expected: str) -> None:
    index = tiny.src("bf16") / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(MixedError) as exc:
        Source("bf16", tiny.src("bf16")).weight_map
    msg = str(exc.value)
    assert str(index) in msg and expected in msg and "regenerate or re-download it" in msg


@pytest.mark.parametrize("shard", ["../fp8/model-00001-of-00003.safetensors", "missing.safetensors"])
def test_index_naming_shard_outside_or_missing(tiny: Any, shard: str) -> None:
    index = tiny.index("bf16")
    index["weight_map"]["model.norm.weight"] = shard
    (tiny.src("bf16") / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MixedError) as exc:
        Source("bf16", tiny.src("bf16")).weight_map
    assert f"names shard {shard!r}, which is not in {tiny.src('bf16')}" in str(exc.value)


class _Explode:
    """Unpickling this creates ``path``: proof that something unpickled it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_only_checkpoint_is_refused_unopened(tiny: Any, tmp_path: Path, fname: str) -> None:
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(tiny.src("bf16") / "config.json", ckpt)
    sentinel = tmp_path / "unpickled"
    (ckpt / fname).write_bytes(pickle.dumps(_Explode(sentinel)))
    src = Source("pk", ckpt)
    with pytest.raises(MixedError) as exc:
        src.weight_map
    msg = str(exc.value)
    assert f"source 'pk' ({ckpt})" in msg and fname in msg
    assert "never unpickles" in msg
    assert "save_pretrained('OUT', safe_serialization=True)" in msg and str(ckpt) in msg
    assert not sentinel.exists()


def test_directory_without_weights(tiny: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny.src("bf16") / "config.json", empty)
    with pytest.raises(MixedError) as exc:
        Source("e", empty).weight_map
    assert "no model.safetensors.index.json and no model.safetensors" in str(exc.value)


def test_missing_directory_and_file_instead_of_directory(tmp_path: Path) -> None:
    with pytest.raises(MixedError, match="directory does not exist; fix the path under 'sources:'"):
        Source("a", tmp_path / "nope")
    file = tmp_path / "file.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(MixedError, match="is a file, not a checkpoint directory"):
        Source("a", file)
    with pytest.raises(MixedError, match="no config.json"):
        Source("a", tmp_path)


def test_headers_read_once_per_shard(tiny_master: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm_mixed.sources as sources_mod

    calls: list[Path] = []

    read = sources_mod.read_header_and_identity

    def counting(path: Path) -> Any:
        calls.append(path)
        return read(path)

    monkeypatch.setattr(sources_mod, "read_header_and_identity", counting)
    src = Source("s", tiny_master / "bf16")
    for name in src.weight_map:
        src.tensor(name)
    src.total_bytes()
    assert sorted(calls) == sorted(set(src.weight_map.values()))
