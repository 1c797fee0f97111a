"""Header-true, data-sparse checkpoints at a real model's shape.

Each shard has a real safetensors header for every tensor the published
checkpoint holds, and a data region of the right length left as a sparse
hole, so ``plan`` and ``compose`` see the real model (tens of GB of
"weights") for almost no disk. The layout of each format is the one
``make-tiny`` writes (``Format.tiny``)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from vllm_mixed.formats import TINY_FORMATS, Format
from vllm_mixed.models import layers_for
from vllm_mixed.safetensors_header import DTYPE_SIZES
from vllm_mixed.testing.published import published_config
from vllm_mixed.tiny import checkpoint_config

__all__ = ["format_of_directory", "tensor_entries", "write_sparse_checkpoint"]

_FLOAT = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def format_of_directory(name: str) -> Format:
    """The format ``make-tiny`` writes under directory ``name`` (bf16, fp8, gptq-int4)."""
    for fmt in TINY_FORMATS:
        if fmt.tiny.directory == name:
            return fmt
    raise KeyError(f"no tiny layout named {name!r}; known: {', '.join(f.tiny.directory for f in TINY_FORMATS)}")


def tensor_entries(cfg: dict[str, Any], fmt: Format) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor a checkpoint of ``fmt`` holds."""
    out = []
    float_dtype = _FLOAT[fmt.tiny.float_dtype]
    for layer in layers_for(cfg, "config"):
        for m in layer.members:
            if layer.quantizable and fmt.quantized:
                for suffix, spec in fmt.specs(*m.shape, fmt.tiny.quant_config).items():
                    out.append((f"{m.name}.{suffix}", spec.dtypes[0], spec.shape))
            else:
                out.append((f"{m.name}.weight", float_dtype, m.shape))
            if m.bias:
                out.append((f"{m.name}.bias", float_dtype, m.shape[:1]))
    return out


def write_sparse_checkpoint(directory: Path, name: str, shards: int = 4, config: dict[str, Any] | None = None) -> Path:
    """``directory/name``: the checkpoint of the format ``make-tiny`` writes
    under ``name``, at the shape of ``config`` (default: Qwen3-30B-A3B)."""
    cfg = config or published_config("qwen3-30b-a3b")
    fmt = format_of_directory(name)
    out = directory / name
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(checkpoint_config(cfg, fmt)))
    entries = tensor_entries(cfg, fmt)
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
