"""The one checkpoint writer: tensors streamed into safetensors shards named
as published checkpoints name them (``model-0000i-of-0000n.safetensors``)
plus ``model.safetensors.index.json``. ``make-tiny``, ``export`` and the
benchmarks' checkpoints all go through it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["INDEX", "ShardWriter", "write_checkpoint"]

INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Buffers tensors up to about ``shard_bytes`` and writes each full shard
    under a temporary name (memory stays near one shard); :meth:`finish`
    gives the shards their final names and writes the index, :meth:`abort`
    removes what was written."""

    def __init__(self, out: str | Path, shard_bytes: int):
        self.out, self.shard_bytes = Path(out), shard_bytes
        self.out.mkdir(parents=True, exist_ok=True)
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.shard_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        """End the current shard (callers may also end one early, e.g. per layer)."""
        if not self.buffer:
            return
        path = self.out / f"model-{len(self.written) + 1:05d}.safetensors.partial"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> list[Path]:
        self.flush()
        n = len(self.written)
        weight_map: dict[str, str] = {}
        paths = []
        for i, (path, names) in enumerate(self.written):
            final = self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            paths.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return paths

    def abort(self) -> None:
        for path, _ in self.written:
            path.unlink(missing_ok=True)


def write_checkpoint(
    directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], shard_bytes: int = 2**20
) -> list[Path]:
    """Write ``config.json`` and ``tensors`` in shards of about ``shard_bytes``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    writer = ShardWriter(out, shard_bytes)
    for name, t in tensors.items():
        writer.add(name, t)
    return writer.finish()
