"""Published ``config.json`` files of real models (data, for sparse
checkpoints and benchmarks at their shape); each file's origin is in
``SOURCES``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SOURCES", "published_config"]

HERE = Path(__file__).resolve().parent

# model -> where its config.json was taken from
SOURCES = {
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B config.json (shared/docs/qwen3-30b-a3b-config.json, from Hugging Face)",
}


def published_config(model: str) -> dict[str, Any]:
    """The published config.json of ``model`` (a key of ``SOURCES``)."""
    if model not in SOURCES:
        raise KeyError(f"no published config for {model!r}; known: {', '.join(sorted(SOURCES))}")
    return json.loads((HERE / f"{model}.json").read_text())
