"""``compose``: a small servable model directory. Its ``config.json`` is the
base checkpoint's with ``quantization_config = {"quant_method": "mixed", ...}``
carrying the resolved recipe, the sources and every layer's route; tokenizer
and generation files are copied from the base. No weights are copied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vllm_mixed.composition import Composition
from vllm_mixed.errors import MixedError
from vllm_mixed.plan import LoadPlan

__all__ = ["compose"]

# files copied from the base checkpoint (when present)
BASE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def compose(plan: LoadPlan, out: str | Path) -> Path:
    """Write the composed directory for a validated plan."""
    out = Path(out)
    if out.exists() and any(out.glob("*.safetensors*")):
        raise MixedError(f"{out}: holds safetensors files; compose writes a weightless directory, choose an empty one")
    base = plan.base
    out.mkdir(parents=True, exist_ok=True)
    config = dict(base.config)
    config["quantization_config"] = Composition.from_plan(plan).to_dict()
    config["torch_dtype"] = plan.recipe.dtype
    if "dtype" in config:
        config["dtype"] = plan.recipe.dtype
    (out / "config.json").write_text(_dump_config(config))
    for name in BASE_FILES:
        if (base.path / name).is_file():
            shutil.copyfile(base.path / name, out / name)
    return out


def _dump_config(config: dict) -> str:
    """config.json indented as Hugging Face writes it, except that each
    composed layer takes one line: a layer lists its fused members (384 for a
    Qwen3-30B-A3B expert layer), which one number per line would make tens
    of megabytes of whitespace."""
    layers = config["quantization_config"]["layers"]
    marker = "\u0000layers"
    shell = {**config, "quantization_config": {**config["quantization_config"], "layers": marker}}
    lines = [f"      {json.dumps(k)}: {json.dumps(v, separators=(', ', ': '))}" for k, v in layers.items()]
    body = "{\n" + ",\n".join(lines) + "\n    }" if lines else "{}"
    return json.dumps(shell, indent=2).replace(json.dumps(marker), body, 1) + "\n"
