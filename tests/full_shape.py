"""Header-true, data-sparse checkpoints at Qwen3-30B-A3B's real shape.

Each shard has a real safetensors header for every tensor the published
checkpoint holds, and a data region of the right length left as a sparse
hole, so ``plan`` and ``compose`` see the real model (tens of GB of
"weights") for almost no disk."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from vllm_mixed.architectures import layers_for
from vllm_mixed.formats import FORMATS
from vllm_mixed.formats.unquantized import FLOAT_DTYPES
from vllm_mixed.safetensors_header import DTYPE_SIZES
from vllm_mixed.tiny import FP8_QUANT_CONFIG, GPTQ_QUANT_CONFIG

CONFIG = Path(__file__).resolve().parents[1] / "benchmarks" / "qwen3-30b-a3b-config.json"
LAYOUTS = {
    "bf16": ("unquantized", None, "BF16"),
    "fp8": ("fp8_block", FP8_QUANT_CONFIG, "BF16"),
    "gptq-int4": ("gptq_int4", GPTQ_QUANT_CONFIG, "F16"),
}


def tensor_entries(
    cfg: dict[str, Any], fmt: str, qc: dict[str, Any] | None, float_dtype: str
) -> list[tuple[str, str, tuple[int, ...]]]:
    out = []
    for layer in layers_for(cfg, "config"):
        for m in layer.members:
            if layer.quantizable and fmt != "unquantized":
                for suffix, spec in FORMATS[fmt].specs(*m.shape, qc).items():
                    out.append((f"{m.name}.{suffix}", spec.dtypes[0], spec.shape))
            else:
                assert float_dtype in FLOAT_DTYPES
                out.append((f"{m.name}.weight", float_dtype, m.shape))
    return out


def write_sparse_checkpoint(directory: Path, name: str, shards: int = 4) -> Path:
    cfg = json.loads(CONFIG.read_text())
    fmt, qc, float_dtype = LAYOUTS[name]
    out = directory / name
    out.mkdir(parents=True)
    config = dict(cfg, torch_dtype="bfloat16" if float_dtype == "BF16" else "float16")
    if qc:
        config["quantization_config"] = dict(qc)
    (out / "config.json").write_text(json.dumps(config))
    entries = tensor_entries(cfg, fmt, qc, float_dtype)
    per = -(-len(entries) // shards)
    weight_map = {}
    for i in range(shards):
        chunk = entries[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for tname, dtype, shape in chunk:
            size = DTYPE_SIZES[dtype]
            for d in shape:
                size *= d
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
