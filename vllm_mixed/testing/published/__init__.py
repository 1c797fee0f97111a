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
    "Qwen/Qwen3-32B-FP8": (
        f"{_HF.format('Qwen/Qwen3-32B-FP8')} (the Qwen3 FP8 block layout; same-family evidence only: the "
        "transformers print of a Qwen3-8B-FP8 config in the GitHub corpus (find_string id 62741608566) has the same "
        "four keys (activation_scheme dynamic, fmt e4m3, quant_method fp8, weight_block_size [128, 128]), no "
        "modules_to_not_convert and dtype bfloat16, and a summary table of Qwen's FP8 configs (id 53948922559, not "
        f"a copy of the file) lists Qwen3-32B-FP8 with those four keys and no exclusions; {_UNCHECKED} for 32B)"
    ),
    "Qwen/Qwen3-32B-AWQ": (
        f"{_HF.format('Qwen/Qwen3-32B-AWQ')}; every quantization_config key (bits 4, group_size 128, "
        "modules_to_not_convert null, quant_method awq, version gemm, zero_point true) and dtype float16 as in the "
        "transformers Qwen3Config print of a local Qwen3-32B-AWQ checkpoint (64 layers, hidden 5120) stored in the "
        "GitHub corpus (find_string id 62727925985)"
    ),
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16": (
        f"{_HF.format('RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16')} (llm-compressor output; {_UNCHECKED})"
    ),
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic": (
        f"{_HF.format('RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic')} (per-channel FP8 weights, dynamic "
        f"per-token activations; {_UNCHECKED})"
    ),
    "TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ": (
        f"{_HF.format('TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ')} (branch main: 4-bit, act-order, no group size; "
        "same-publisher evidence only: the TheBloke/TinyLlama-1.1B-Chat-v1.0-GPTQ quantize_config.json quoted in the "
        "GitHub corpus (find_string id 63241653895) has bits 4, damp_percent 0.1, desc_act true, sym true, "
        "true_sequential true, model_name_or_path null, model_file_base_name model (plus static_groups false, absent "
        "here), and Intel code citing TheBloke/Llama-2-7B-Chat-GPTQ's config.json (id 2782246513) uses this entry's "
        f"nine keys; {_UNCHECKED} for this checkpoint, group_size -1 included)"
    ),
    "Qwen/Qwen3-235B-A22B-FP8": (
        f"{_HF.format('Qwen/Qwen3-235B-A22B-FP8')} (modules_to_not_convert in the pattern docs/qwen3-30b-a3b.md "
        "verified for Qwen3-30B-A3B-FP8: lm_head and every layer's norms and router; same-family evidence: the "
        "transformers print of a Qwen3-30B-A3B-Thinking-2507-FP8 config in the GitHub corpus (find_string id "
        "62570066099) has the same five keys and the same list order (lm_head, then per layer input_layernorm, "
        "mlp.gate, post_attention_layernorm), and a summary table of Qwen's FP8 configs (id 53948922559, not a copy "
        f"of the file) gives 235B that exclusion pattern; {_UNCHECKED} for 235B)"
    ),
    "Qwen/Qwen3-235B-A22B-GPTQ-Int4": (
        f"{_HF.format('Qwen/Qwen3-235B-A22B-GPTQ-Int4')} (the GPTQModel config of Qwen3-30B-A3B-GPTQ-Int4, "
        "docs/qwen3-30b-a3b.md; same-family evidence: the Qwen3-30B-A3B-GPTQ-Int4 config.json pasted in a GPTQModel "
        "issue stored in the GitHub corpus (find_string id 69846854025) has all eleven keys with these values and "
        "torch_dtype float16, and a summary table of Qwen's GPTQ configs (id 53948922559, not a copy of the file) "
        f"gives 235B the same core keys; {_UNCHECKED} for 235B)"
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
