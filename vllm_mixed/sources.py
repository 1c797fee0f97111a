"""One checkpoint directory: its format, its config and where each tensor is.

The format is detected from the directory's own ``config.json``
(``quantization_config``) by the format registry. Tensors are located through
``model.safetensors.index.json`` or a single ``model.safetensors``; only
headers are read, each shard's once (it gives the tensors and the shard's
identity). Pickle checkpoints are refused and never opened.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from vllm_mixed.errors import MixedError
from vllm_mixed.formats import detect_format
from vllm_mixed.safetensors_header import ShardIdentity, TensorInfo, read_header_and_identity

__all__ = ["Source"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Source:
    """A checkpoint directory named in a recipe. Reads ``config.json`` at
    construction; the shard index and headers are read on first use."""

    def __init__(self, name: str, path: str | Path):
        self.name = name
        self.path = Path(path)
        where = f"source {name!r} ({self.path})"
        if not self.path.exists():
            raise MixedError(f"{where}: directory does not exist; fix the path under 'sources:' in the recipe")
        if not self.path.is_dir():
            raise MixedError(
                f"{where}: is a file, not a checkpoint directory; point the source at the directory holding config.json"
            )
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise MixedError(
                f"{where}: no config.json; a source must be a Hugging Face model directory with config.json and safetensors shards"
            )
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (ValueError, RecursionError) as exc:
            raise MixedError(f"{cfg_path}: not valid JSON ({exc}); restore the checkpoint's config.json") from None
        if not isinstance(self.config, dict):
            raise MixedError(f"{cfg_path}: expected a JSON object; restore the checkpoint's config.json")
        self.quant_config: dict[str, Any] | None = self.config.get("quantization_config") or None
        if self.quant_config is not None and not isinstance(self.quant_config, dict):
            raise MixedError(
                f"{cfg_path}: quantization_config is {self.quant_config!r}, not an object such as "
                '{"quant_method": "fp8", ...}; restore the checkpoint\'s config.json'
            )
        self.format = detect_format(self.quant_config, f"{where} config.json")
        self.where = where

    def __repr__(self) -> str:
        return f"Source({self.name!r}, {str(self.path)!r}, {self.format})"

    @property
    def dtype(self) -> str:
        """The checkpoint's own float dtype, as declared by its config."""
        return str(self.config.get("torch_dtype") or self.config.get("dtype") or "bfloat16")

    @cached_property
    def weight_map(self) -> dict[str, Path]:
        """Tensor name -> shard file, from the index or the single file."""
        index = self.path / INDEX
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                raw = data["weight_map"]
                if not isinstance(raw, dict) or not all(isinstance(f, str) for f in raw.values()):
                    raise TypeError("weight_map must map tensor names to shard file names")
            except (ValueError, RecursionError, KeyError, TypeError) as exc:
                raise MixedError(
                    f"{index}: not a valid safetensors index ({exc}); regenerate or re-download it"
                ) from None
            shards: dict[str, Path] = {}
            for fname in sorted(set(raw.values())):
                shard = self.path / str(fname)
                if "/" in str(fname) or not shard.is_file():
                    raise MixedError(
                        f"{index}: names shard {fname!r}, which is not in {self.path}; "
                        "download the missing shard or regenerate the index"
                    )
                shards[fname] = shard
            return {name: shards[fname] for name, fname in raw.items()}
        single = self.path / SINGLE
        if single.is_file():
            return dict.fromkeys(self._headers(single), single)
        pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
        if pickles:
            raise MixedError(
                f"{self.where}: holds only PyTorch pickle weights ({', '.join(pickles[:3])}); vllm-mixed reads "
                "safetensors only and never unpickles. Convert it once, from a source you trust: "
                'python -c "from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{self.path}').save_pretrained('OUT', safe_serialization=True)\" "
                "and point the recipe at OUT"
            )
        raise MixedError(f"{self.where}: no {INDEX} and no {SINGLE}; the checkpoint's weights are missing")

    def _headers(self, shard: Path) -> dict[str, TensorInfo]:
        return self.read_shard(shard)[0]

    def read_shard(self, shard: Path) -> tuple[dict[str, TensorInfo], ShardIdentity]:
        """A shard's tensors and identity, from one header read (cached)."""
        cache = self.__dict__.setdefault("_header_cache", {})
        if shard not in cache:
            cache[shard] = read_header_and_identity(shard)
        return cache[shard]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> TensorInfo:
        """Header facts of one tensor; a clear error if it is not there."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise MixedError(
                f"{self.where}: tensor {name!r} is in no shard; the checkpoint is incomplete or is not the model "
                "the recipe expects; check the source path"
            )
        info = self._headers(shard).get(name)
        if info is None:
            raise MixedError(
                f"{shard}: the index lists tensor {name!r} in this shard but its header does not; "
                "the index is stale, regenerate it or re-download the checkpoint"
            )
        return info

    def total_bytes(self) -> int:
        """Bytes of tensor data in every shard the checkpoint uses."""
        return sum(sum(t.nbytes for t in self._headers(s).values()) for s in set(self.weight_map.values()))
