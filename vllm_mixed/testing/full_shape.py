"""Header-true, data-sparse checkpoints at a real model's shape.

Each shard has a real safetensors header for every tensor the published
checkpoint holds, and a data region of the right length left as a sparse
hole, so ``plan`` and ``compose`` see the real model (tens of GB of
"weights") for almost no disk. ``write_sparse_checkpoint`` uses the layout
``make-tiny`` writes (``Format.tiny``); ``write_published_checkpoint`` the
published checkpoint's own ``quantization_config`` (its format detected as
``Source`` detects it)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from vllm_mixed.formats import TINY_FORMATS, UNQUANTIZED, Format, detect_format, get_format
from vllm_mixed.models import layers_for
from vllm_mixed.safetensors_header import DTYPE_SIZES
from vllm_mixed.testing.published import published_config
from vllm_mixed.tiny import checkpoint_config

__all__ = ["format_of_directory", "tensor_entries", "write_published_checkpoint", "write_sparse_checkpoint"]

_FLOAT = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def format_of_directory(name: str) -> Format:
    """The format ``make-tiny`` writes under directory ``name`` (bf16, fp8, gptq-int4)."""
    for fmt in TINY_FORMATS:
        if fmt.tiny.directory == name:
            return fmt
    raise KeyError(f"no tiny layout named {name!r}; known: {', '.join(f.tiny.directory for f in TINY_FORMATS)}")


def tensor_entries(
    cfg: dict[str, Any], fmt: Format, quant_config: dict[str, Any] | None = None, float_dtype: str | None = None
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor a checkpoint of ``fmt``
    holds (``quant_config``/``float_dtype``: the tiny layout's unless given)."""
    out = []
    qc = quant_config if quant_config is not None else (fmt.tiny.quant_config if fmt.tiny else None)
    float_ = _FLOAT[float_dtype or fmt.tiny.float_dtype]
    for layer in layers_for(cfg, "config"):
        for m in layer.members:
            if layer.quantizable and fmt.quantized:
                for suffix, spec in fmt.specs(*m.shape, qc).items():
                    out.append((f"{m.name}.{suffix}", spec.dtypes[0], spec.shape))
            else:
                out.append((f"{m.name}.weight", float_, m.shape))
            if m.bias:
                out.append((f"{m.name}.bias", float_, m.shape[:1]))
    return out


def write_sparse_checkpoint(directory: Path, name: str, shards: int = 4, config: dict[str, Any] | None = None) -> Path:
    """``directory/name``: the checkpoint of the format ``make-tiny`` writes
    under ``name``, at the shape of ``config`` (default: Qwen3-30B-A3B)."""
    cfg = config or published_config("qwen3-30b-a3b")
    fmt = format_of_directory(name)
    return _write(directory / name, checkpoint_config(cfg, fmt), tensor_entries(cfg, fmt), shards)


def write_published_checkpoint(
    directory: Path, config: dict[str, Any], quant_config: dict[str, Any] | None = None, shards: int = 4
) -> Path:
    """``directory``: a checkpoint of ``config`` (a published config.json)
    quantized as ``quant_config`` (a published ``quantization_config``; None:
    the float checkpoint) says, float tensors in the config's
    ``torch_dtype``. Raises MixedError where no registered format reads
    ``quant_config``."""
    fmt = get_format(detect_format(quant_config, f"{directory}/config.json")) if quant_config else UNQUANTIZED
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    if quant_config:
        cfg["quantization_config"] = quant_config
    float_dtype = str(cfg.get("torch_dtype") or "bfloat16")
    return _write(directory, cfg, tensor_entries(cfg, fmt, quant_config, float_dtype), shards)


def _write(out: Path, config: dict[str, Any], entries: list[tuple[str, str, tuple[int, ...]]], shards: int) -> Path:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    per = -(-len(entries) // shards)
    weight_map = {}
    for i in range(shards):
        chunk = entries[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for tname, dtype, shape in chunk:
            size = DTYPE_SIZES[dtype] * math.prod(shape)
            header[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[tname] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with (out / fname).open("wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)  # sparse data region
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
