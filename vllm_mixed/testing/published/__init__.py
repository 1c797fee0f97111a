"""Published ``config.json`` files of real models and the
``quantization_config`` of their published quantized checkpoints (data, for
sparse checkpoints and benchmarks at their shape); each one's origin is in
``SOURCES``.

No network reaches this project's machines except PyPI, so the files of the
models below were transcribed from their Hugging Face repositories
(``https://huggingface.co/<repo>/blob/main/config.json``) and their shape
keys checked against public copies in the GitHub corpus where one was found;
what could not be checked against a stored copy is marked *unverified*."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINTS", "SOURCES", "published_checkpoint", "published_config"]

HERE = Path(__file__).resolve().parent
_HF = "https://huggingface.co/{}/blob/main/config.json"
_UNCHECKED = "transcribed, no stored copy found: unverified"

# model -> where its config.json was taken from
SOURCES = {
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B config.json (shared/docs/qwen3-30b-a3b-config.json, from Hugging Face)",
    "qwen3-32b": (
        f"{_HF.format('Qwen/Qwen3-32B')}; shape keys (hidden 5120, intermediate 25600, 64 layers, 64/8 heads, "
        "head_dim 128, vocab 151936, rope_theta 1e6) as in the Qwen3-32B configs stored in the GitHub corpus "
        "(find_string ids 54147085993, 54896827577, 57952012531); the other keys unverified"
    ),
    "llama-3.1-8b-instruct": (
        f"{_HF.format('meta-llama/Llama-3.1-8B-Instruct')}; shape and rope_scaling keys as in the Llama-3.1-8B "
        "style configs stored in the GitHub corpus (find_string ids 56129998493, 54003156338)"
    ),
    "mixtral-8x7b-instruct-v0.1": (
        f"{_HF.format('mistralai/Mixtral-8x7B-Instruct-v0.1')}; shape keys as in the MixtralConfig print of "
        "mistralai/Mixtral-8x7B-Instruct-v0.1 in the code corpus (search 'Mixtral-8x7B-Instruct-v0.1 config.json', "
        "rank 5; transformers adds head_dim 128 there, the published file has none)"
    ),
    "qwen3-235b-a22b": (
        f"{_HF.format('Qwen/Qwen3-235B-A22B')}; shape keys as in the Qwen3-235B-A22B demo config stored in the "
        "GitHub corpus (find_string id 20223843278; that copy is the 2507 revision: 262144 positions, rope_theta 5e6)"
    ),
}

# published quantized checkpoint -> where its quantization_config (and torch_dtype) was taken from
CHECKPOINTS = {
    "Qwen/Qwen3-32B-FP8": f"{_HF.format('Qwen/Qwen3-32B-FP8')} (the Qwen3 FP8 block layout; {_UNCHECKED})",
    "Qwen/Qwen3-32B-AWQ": f"{_HF.format('Qwen/Qwen3-32B-AWQ')} ({_UNCHECKED})",
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16": (
        f"{_HF.format('RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16')} (llm-compressor output; {_UNCHECKED})"
    ),
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic": (
        f"{_HF.format('RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic')} (per-channel FP8 weights, dynamic "
        f"per-token activations; {_UNCHECKED})"
    ),
    "TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ": (
        f"{_HF.format('TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ')} (branch main: 4-bit, act-order, no group size; "
        f"{_UNCHECKED})"
    ),
    "Qwen/Qwen3-235B-A22B-FP8": (
        f"{_HF.format('Qwen/Qwen3-235B-A22B-FP8')} (modules_to_not_convert in the pattern docs/qwen3-30b-a3b.md "
        f"verified for Qwen3-30B-A3B-FP8: lm_head and every layer's norms and router; {_UNCHECKED} for 235B)"
    ),
    "Qwen/Qwen3-235B-A22B-GPTQ-Int4": (
        f"{_HF.format('Qwen/Qwen3-235B-A22B-GPTQ-Int4')} (the GPTQModel config of Qwen3-30B-A3B-GPTQ-Int4, "
        f"docs/qwen3-30b-a3b.md; {_UNCHECKED} for 235B)"
    ),
}


def published_config(model: str) -> dict[str, Any]:
    """The published config.json of ``model`` (a key of ``SOURCES``)."""
    if model not in SOURCES:
        raise KeyError(f"no published config for {model!r}; known: {', '.join(sorted(SOURCES))}")
    return json.loads((HERE / f"{model}.json").read_text())


def published_checkpoint(repo: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, quantization_config) of the published quantized
    checkpoint ``repo`` (a key of ``CHECKPOINTS``): its model's config with
    the checkpoint's own ``torch_dtype``, and its ``quantization_config``."""
    if repo not in CHECKPOINTS:
        raise KeyError(f"no published checkpoint {repo!r}; known: {', '.join(sorted(CHECKPOINTS))}")
    entry = json.loads((HERE / "quantization_configs.json").read_text())[repo]
    return {**published_config(entry["model"]), "torch_dtype": entry["torch_dtype"]}, entry["quantization_config"]
