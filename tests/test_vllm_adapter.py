"""The vLLM adapter without an engine: registration, ``from_config`` from
both a composed config.json and a bare recipe path, pickling (vLLM ships the
config to every worker pickled), and routing decisions."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest

from vllm_mixed.compose import compose
from vllm_mixed.composition import Composition
from vllm_mixed.errors import MixedError
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe


def test_import_registers_nothing_and_register_is_idempotent():
    code = (
        "import sys, vllm_mixed\n"
        "assert 'vllm' not in sys.modules, 'importing vllm_mixed imported vllm'\n"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config\n"
        "from vllm.model_executor.model_loader import get_model_loader\n"
        "assert 'mixed' not in QUANTIZATION_METHODS\n"
        "vllm_mixed.register(); vllm_mixed.register()\n"
        "assert QUANTIZATION_METHODS.count('mixed') == 1, QUANTIZATION_METHODS\n"
        "print(get_quantization_config('mixed').__name__)\n"
        "from vllm.config import LoadConfig\n"
        "print(type(get_model_loader(LoadConfig(load_format='mixed'))).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["MixedPrecisionConfig", "MixedModelLoader"]


@pytest.fixture
def composed(tiny_ro, tmp_path):
    recipe = tiny_ro.recipe()
    plan = build_plan(load_recipe(recipe))
    out = compose(plan, tmp_path / "composed")
    return recipe, plan, json.loads((out / "config.json").read_text())


def test_composed_config_and_recipe_path_agree(composed):
    from vllm_mixed.config import MixedPrecisionConfig

    recipe_path, plan, config = composed
    from_dir = MixedPrecisionConfig.from_config(config["quantization_config"])
    from_path = MixedPrecisionConfig.from_config({"quant_method": "mixed", "recipe": str(recipe_path)})
    assert from_dir.composition == from_path.composition == Composition.from_plan(plan)
    assert from_dir.composition.route("model.layers.1.mlp.experts") == ("int4", "gptq_int4")
    assert from_dir.composition.route("model.layers.0.self_attn.qkv_proj") == ("bf16", "unquantized")
    clone = pickle.loads(pickle.dumps(from_dir))
    assert clone.composition == from_dir.composition
    assert config["torch_dtype"] == "bfloat16" and "model.safetensors.index.json" not in config


def test_override_and_missing_recipe_errors():
    from vllm_mixed.config import MixedPrecisionConfig

    assert (
        MixedPrecisionConfig.override_quantization_method({"quant_method": "fp8"}, "mixed", hf_config=None) == "mixed"
    )
    assert MixedPrecisionConfig.override_quantization_method({"quant_method": "fp8"}, "fp8") is None
    with pytest.raises(MixedError, match="needs a recipe.*vllm-mixed compose"):
        MixedPrecisionConfig.from_config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(MixedError, match="has no recipe"):
        MixedPrecisionConfig().get_quant_method(_linear(), "model.layers.0.self_attn.o_proj")


def _linear():
    from vllm.model_executor.layers.linear import LinearBase

    return LinearBase.__new__(LinearBase)


def test_unknown_layer_is_a_clear_error(composed):
    from vllm_mixed.config import MixedPrecisionConfig

    cfg = MixedPrecisionConfig.from_config(composed[2]["quantization_config"])
    with pytest.raises(MixedError, match="'model.layers.9.self_attn.o_proj' is not in the composed plan"):
        cfg.get_quant_method(_linear(), "model.layers.9.self_attn.o_proj")
    assert cfg.get_quant_method(object(), "model.layers.0.self_attn.attn") is None
