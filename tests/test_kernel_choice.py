"""The plugin's per-layer MoE backend (``kernel_choice``, used by
``MixedPrecisionConfig`` on CUDA): the user's ``--moe-backend`` beats the
recipe's ``kernels`` section, which beats the format's measured table, and a
backend vLLM refuses for a layer falls back to vLLM's own choice unless the
user named it. vLLM's real selection on Hopper is checked on the H200 by
``benchmarks/gpu_oracle.py --kernels``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_mixed.composition import Composition
from vllm_mixed.errors import MixedError
from vllm_mixed.formats import get_format
from vllm_mixed.kernel_choice import (
    AUTO,
    DEFAULT,
    MEASURED,
    RECIPE,
    USER,
    choose_linear_backend,
    choose_moe_backend,
    linear_backend_set,
)
from vllm_mixed.parallel import HOPPER
from vllm_mixed.plan import build_plan, plan_summary
from vllm_mixed.recipe import recipe_from_dict

GPTQ, FP8, BF16 = get_format("gptq_int4"), get_format("fp8_block"), get_format("unquantized")


def recipe(kernels=None):
    body = {"sources": {"bf16": "/tmp", "int4": "/tmp", "fp8": "/tmp"}, "base": "bf16"}
    return recipe_from_dict(body | ({"kernels": kernels} if kernels else {}))


def everything(_name: str) -> bool:
    return True


def test_measured_table_picks_humming_for_int4_experts_on_hopper_only():
    got = choose_moe_backend(GPTQ, "int4", recipe(), AUTO, HOPPER, everything)
    assert (got.backend, got.by) == ("humming", MEASURED)
    assert choose_moe_backend(GPTQ, "int4", recipe(), AUTO, 80, everything).backend == AUTO  # Ampere: not measured
    assert choose_moe_backend(GPTQ, "int4", recipe(), AUTO, None, everything).backend == AUTO  # CPU


def test_other_formats_keep_vllms_choice():
    for fmt in (FP8, BF16):
        assert choose_moe_backend(fmt, "fp8", recipe(), AUTO, HOPPER, everything).backend == AUTO


def test_measured_backend_needs_its_package():
    got = choose_moe_backend(GPTQ, "int4", recipe(), AUTO, HOPPER, lambda name: name != "humming")
    assert got.backend == AUTO and not got.binding


def test_recipe_override_beats_table_and_user_beats_recipe():
    r = recipe({"int4": {"moe_backend": "marlin"}})
    got = choose_moe_backend(GPTQ, "int4", r, AUTO, HOPPER, everything)
    assert (got.backend, got.by) == ("marlin", RECIPE) and "kernels.int4" in got.describe()
    got = choose_moe_backend(GPTQ, "int4", r, "triton", HOPPER, everything)
    assert (got.backend, got.by, got.binding) == ("triton", USER, True)
    # the override is per source: another source's experts keep the table
    assert choose_moe_backend(GPTQ, "bf16", r, AUTO, HOPPER, everything).backend == "humming"


def test_recipe_kernels_are_validated():
    with pytest.raises(MixedError, match=r"kernels\.int8: 'int8' is not a source"):
        recipe({"int8": {"moe_backend": "marlin"}})
    with pytest.raises(
        MixedError, match=r"unknown key 'kernels\.int4\.backend'; allowed keys here: linear_backend, moe_backend"
    ):
        recipe({"int4": {"backend": "marlin"}})
    with pytest.raises(MixedError, match="is not a vLLM backend name"):
        recipe({"int4": {"moe_backend": "Marlin!"}})
    with pytest.raises(MixedError, match="is not a vLLM backend name"):
        recipe({"int4": {"linear_backend": "Machete!"}})


def test_linear_backend_per_source_user_first():
    r = recipe({"int4": {"linear_backend": "machete"}, "fp8": {"linear_backend": "auto"}})
    got = choose_linear_backend("int4", r, AUTO)
    assert (got.backend, got.by) == ("machete", RECIPE) and "kernels.int4.linear_backend" in got.describe()
    assert choose_linear_backend("fp8", r, AUTO).backend == AUTO  # auto in the recipe: vLLM's choice
    assert choose_linear_backend("bf16", r, AUTO).by == DEFAULT  # another source: untouched
    assert choose_linear_backend("int4", r, "marlin").backend == "marlin"  # the user's --linear-backend wins


def test_linear_backend_is_set_only_inside_the_block():
    class KernelConfig:
        linear_backend = "auto"

    kc = KernelConfig()
    with pytest.raises(RuntimeError), linear_backend_set(kc, "machete"):
        assert kc.linear_backend == "machete"
        raise RuntimeError("vLLM failed inside")
    assert kc.linear_backend == "auto"


class _Native:
    """vLLM's side of one source: refuses the backends in ``refuses`` the way
    ``select_wna16_moe_backend`` does for an explicit choice (ValueError)."""

    def __init__(self, refuses=()):
        self.refuses, self.asked = set(refuses), []

    def get_quant_method(self, layer, prefix):
        self.asked.append(layer.moe_config.moe_backend)
        if layer.moe_config.moe_backend in self.refuses:
            raise ValueError(f"WNA16 MoE backend '{layer.moe_config.moe_backend}' does not support the deployment")
        return SimpleNamespace(experts_cls=type("HummingExperts" if self.asked[-1] == "humming" else "MarlinExperts",
                                                (), {}))  # fmt: skip


@pytest.fixture
def config(tiny_master, monkeypatch):
    pytest.importorskip("vllm")
    from vllm_mixed import config as config_module
    from vllm_mixed.config import MixedPrecisionConfig

    layout = SimpleNamespace(capability=HOPPER)
    monkeypatch.setattr(config_module, "engine_layout", lambda: layout)
    monkeypatch.setattr(config_module, "moe_backend_available", everything)
    plan = build_plan(recipe_from_dict(_tiny_recipe(tiny_master)))
    return MixedPrecisionConfig(Composition.from_plan(plan))


def _tiny_recipe(root):
    return {
        "sources": {"bf16": str(root / "bf16"), "int4": str(root / "gptq-int4")},
        "base": "bf16",
        "default": "bf16",
        "rules": [{"targets": ["model.layers.*.mlp.experts"], "source": "int4"}],
    }


def test_the_layer_gets_the_backend_and_the_log_names_what_vllm_built(config):
    layer = SimpleNamespace(moe_config=SimpleNamespace(moe_backend=AUTO))
    native = _Native()
    method, note = config._native_experts(native, layer, "model.layers.0.mlp.experts", "int4", GPTQ)
    assert native.asked == ["humming"] and layer.moe_config.moe_backend == "humming"
    assert "measured table" in note and "vLLM built HummingExperts" in note


def test_a_refused_choice_falls_back_to_vllms_own(config):
    layer = SimpleNamespace(moe_config=SimpleNamespace(moe_backend=AUTO))
    native = _Native(refuses={"humming"})
    method, note = config._native_experts(native, layer, "model.layers.0.mlp.experts", "int4", GPTQ)
    assert native.asked == ["humming", AUTO] and layer.moe_config.moe_backend == AUTO
    assert "humming refused by vLLM" in note and "MarlinExperts" in note


def test_a_refused_user_choice_is_an_error(config):
    layer = SimpleNamespace(moe_config=SimpleNamespace(moe_backend="humming"))  # as --moe-backend humming sets it
    with pytest.raises(ValueError, match="does not support"):
        config._native_experts(_Native(refuses={"humming"}), layer, "model.layers.0.mlp.experts", "int4", GPTQ)


def test_plan_names_the_backend_per_experts_group(tiny_master):
    body = _tiny_recipe(tiny_master) | {"kernels": {"bf16": {"moe_backend": "triton"}}}
    plan = build_plan(recipe_from_dict(body))
    groups = {g["group"]: g for g in plan_summary(plan, {})["groups"]}
    assert groups["experts"]["moe_backend_gpu"].startswith("humming (measured table")
    assert groups["attention"]["moe_backend_gpu"] == "-"


def test_plan_names_a_recipe_linear_backend_for_its_quantized_linears_only(tiny_master):
    body = _tiny_recipe(tiny_master)
    body["rules"] = [*body["rules"], {"targets": ["model.layers.*.self_attn.qkv_proj"], "source": "int4"}]
    body["kernels"] = {"int4": {"linear_backend": "machete"}, "bf16": {"linear_backend": "marlin"}}
    groups = {(g["group"], g["source"]): g for g in plan_summary(build_plan(recipe_from_dict(body)), {})["groups"]}
    assert groups[("attention", "int4")]["linear_backend_gpu"] == "machete (recipe: kernels.int4.linear_backend)"
    assert groups[("attention", "bf16")]["linear_backend_gpu"] == "-"  # o_proj is bf16: no quantized kernel to pick
    assert groups[("experts", "int4")]["linear_backend_gpu"] == "-"


def test_only_the_measured_variant_gets_the_table():
    """Humming was measured for 4-bit GPTQ without act-order (its GPTQ schema
    asserts desc_act false): act-order, 8-bit GPTQ and AWQ keep vLLM's choice."""
    act_order = {"bits": 4, "group_size": 128, "desc_act": True, "sym": True}
    assert choose_moe_backend(GPTQ, "int4", recipe(), AUTO, HOPPER, everything, act_order).backend == AUTO
    plain = dict(act_order, desc_act=False)
    assert choose_moe_backend(GPTQ, "int4", recipe(), AUTO, HOPPER, everything, plain).backend == "humming"
    for name in ("gptq_int8", "awq"):
        assert choose_moe_backend(get_format(name), "int4", recipe(), AUTO, HOPPER, everything, plain).backend == AUTO


class _LinearNative:
    """vLLM's side of one source's linears: records the linear backend its
    kernel selection would read at construction and in ``create_weights``,
    and refuses ``machete`` the way vLLM 0.26's ``choose_mp_linear_kernel``
    does for a backend with no kernel for the layer (ValueError)."""

    def __init__(self, kernel_config, fault=None):
        self.kernel_config, self.fault, self.seen = kernel_config, fault, []

    def get_quant_method(self, layer, prefix):
        self.seen.append(("init", self.kernel_config.linear_backend))
        native = self

        class Method:
            def create_weights(self, layer, **kwargs):
                native.seen.append(("create_weights", native.kernel_config.linear_backend))
                if native.fault:
                    raise ValueError(native.fault)
                if native.kernel_config.linear_backend == "machete":
                    raise ValueError("--linear-backend=machete was requested but no 'machete' kernel exists")

        return Method()


def _linear_config(tiny_master, monkeypatch, kernels):
    pytest.importorskip("vllm")
    import vllm.config

    from vllm_mixed.config import MixedPrecisionConfig

    kernel_config = SimpleNamespace(linear_backend=AUTO)
    monkeypatch.setattr(vllm.config, "get_current_vllm_config", lambda: SimpleNamespace(kernel_config=kernel_config))
    plan = build_plan(recipe_from_dict(_tiny_recipe(tiny_master) | {"kernels": kernels}))
    return MixedPrecisionConfig(Composition.from_plan(plan)), kernel_config


def test_a_recipe_linear_backend_holds_only_while_vllm_picks_the_kernel(tiny_master, monkeypatch):
    config, kernel_config = _linear_config(tiny_master, monkeypatch, {"int4": {"linear_backend": "cutlass"}})
    native = _LinearNative(kernel_config)
    method, note = config._native_linear(native, None, "model.layers.0.self_attn.qkv_proj", "int4")
    assert kernel_config.linear_backend == AUTO  # restored after construction
    method.create_weights(layer=None, input_size=8)
    assert native.seen == [("init", "cutlass"), ("create_weights", "cutlass")] and kernel_config.linear_backend == AUTO
    assert note == " [linear backend asked: cutlass (recipe: kernels.int4.linear_backend)]"
    plain = _LinearNative(kernel_config)  # another source: the engine's own setting, no note
    _, note = config._native_linear(plain, None, "model.layers.0.self_attn.o_proj", "bf16")
    assert plain.seen == [("init", AUTO)] and note == ""


def test_a_linear_backend_vllm_refuses_names_the_recipe_key(tiny_master, monkeypatch):
    config, kernel_config = _linear_config(tiny_master, monkeypatch, {"int4": {"linear_backend": "machete"}})
    method, _ = config._native_linear(_LinearNative(kernel_config), None, "model.layers.0.mlp.down_proj", "int4")
    with pytest.raises(MixedError, match=r"recipe kernels\.int4\.linear_backend: vLLM has no 'machete' linear kernel "
                       r"for model\.layers\.0\.mlp\.down_proj"):  # fmt: skip
        method.create_weights(layer=None)
    assert kernel_config.linear_backend == AUTO
    other, _ = config._native_linear(_LinearNative(kernel_config, "shape mismatch"), None, "x.down_proj", "int4")
    with pytest.raises(ValueError, match="shape mismatch"):  # vLLM's other faults stay vLLM's
        other.create_weights(layer=None)
