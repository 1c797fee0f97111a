"""Shared fixtures: the tiny Qwen3-MoE from ``make_tiny`` in its three
published formats, made once per session, and a private copy for tests that
change files. Everything lives under pytest's temporary directories."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vllm_mixed.tiny import make_tiny

SOURCE_DIRS = {"bf16": "bf16", "fp8": "fp8", "int4": "gptq-int4"}  # recipe source name -> directory


class TinyModel:
    """One tiny model directory (``bf16/``, ``fp8/``, ``gptq-int4/``,
    ``recipe.yaml``) plus helpers to write recipes and damage files."""

    def __init__(self, root: Path, recipe_dir: Path, relative: bool):
        self.root = root
        self.recipe_dir = recipe_dir
        self.relative = relative
        self._n = count()

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    def src(self, name: str) -> Path:
        """Directory of a recipe source (``bf16``, ``fp8``, ``int4``)."""
        return self.root / SOURCE_DIRS.get(name, name)

    def recipe_data(self) -> dict[str, Any]:
        return yaml.safe_load(self.recipe_path.read_text())

    def recipe(self, **changes: Any) -> Path:
        """Write the make-tiny recipe with top-level keys replaced (a value of
        ``...`` deletes the key); returns the new file's path."""
        data = self.recipe_data()
        for key, value in changes.items():
            if value is ...:
                data.pop(key, None)
            else:
                data[key] = value
        if not self.relative and isinstance(data.get("sources"), dict):
            data["sources"] = {k: str(self.root / v) for k, v in data["sources"].items()}
        path = self.recipe_dir / f"recipe-{next(self._n)}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def config(self, name: str) -> dict[str, Any]:
        return json.loads((self.src(name) / "config.json").read_text())

    def set_config(self, name: str, **changes: Any) -> None:
        cfg = self.config(name)
        cfg.update(changes)
        (self.src(name) / "config.json").write_text(json.dumps(cfg, indent=2))

    def index(self, name: str) -> dict[str, Any]:
        return json.loads((self.src(name) / "model.safetensors.index.json").read_text())

    def shard_of(self, name: str, tensor: str) -> Path:
        return self.src(name) / self.index(name)["weight_map"][tensor]

    def shards(self, name: str) -> list[Path]:
        return sorted(self.src(name).glob("*.safetensors"))

    def rewrite(self, name: str, tensor: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Path:
        """Replace one tensor of a source's shard by ``fn(old)`` (``None``
        removes it, from the index too); returns the shard path."""
        shard = self.shard_of(name, tensor)
        tensors = load_file(shard)
        new = fn(tensors[tensor])
        if new is None:
            del tensors[tensor]
            index = self.index(name)
            del index["weight_map"][tensor]
            (self.src(name) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        else:
            tensors[tensor] = new.contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})
        return shard


def header_length(path: Path) -> int:
    """The safetensors header length field, read with struct, not our reader."""
    with path.open("rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


@pytest.fixture(scope="session")
def tiny_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make_tiny`` output, made once; tests must not change it."""
    root = tmp_path_factory.mktemp("tiny-master") / "model"
    make_tiny(root)
    return root


@pytest.fixture
def tiny_ro(tiny_master: Path, tmp_path: Path) -> TinyModel:
    """The shared tiny model, read-only: recipes go to this test's tmp_path
    with absolute source paths."""
    return TinyModel(tiny_master, tmp_path, relative=False)


@pytest.fixture
def tiny(tiny_master: Path, tmp_path: Path) -> TinyModel:
    """A private copy of the tiny model that the test may change."""
    root = tmp_path / "model"
    shutil.copytree(tiny_master, root)
    return TinyModel(root, root, relative=True)


@pytest.fixture
def header_len() -> Callable[[Path], int]:
    return header_length


# --- vLLM's parameter registration, compared with the fallback's ---------------------------------------------
DIMS = ("input_dim", "output_dim", "packed_dim", "packed_factor")


def described(layer: torch.nn.Module) -> dict[str, tuple]:
    """Each parameter's vLLM class, shape, dtype and sharding dims."""
    return {
        name: (type(p).__name__, tuple(p.shape), p.dtype, tuple(getattr(p, f"_{d}", None) for d in DIMS))
        for name, p in layer.named_parameters()
    }


@pytest.fixture(scope="module")
def one_rank():
    """vLLM's current config and tensor-parallel group patched to one rank,
    so its methods' ``create_weights`` run on a bare module."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    config = VllmConfig()
    config.model_config = mock.Mock(dtype=torch.bfloat16)
    group = mock.Mock(world_size=1, rank_in_group=0)
    with mock.patch.object(parallel_state, "get_tp_group", return_value=group), set_current_vllm_config(config):
        yield
