"""compressed-tensors round trips: what ``export`` writes is readable as a
source (detected as ``ct_w4a16`` / ``ct_fp8``, every layer decoding to the
same weights as the recipe it was exported from), and a compressed-tensors
source exports bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vllm_mixed.errors import MixedError
from vllm_mixed.export import export
from vllm_mixed.formats import UNQUANTIZED
from vllm_mixed.formats.ct_fp8 import CT_FP8
from vllm_mixed.formats.ct_w4a16 import CT_W4A16, w4a16_config
from vllm_mixed.plan import LoadPlan, build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.testing.reference import dequantized_weights
from vllm_mixed.tiny import make_tiny

EXPERTS = ["model.layers.*.mlp.experts"]
ATTENTION = ["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_mixed.formats import TINY_FORMATS

    path = tmp_path_factory.mktemp("ct-roundtrip")
    make_tiny(path, formats=(*TINY_FORMATS, CT_W4A16, CT_FP8))
    return path


def plan_of(root: Path, tmp: Path, default: str, rules: list[dict], extra: dict[str, Path] | None = None) -> LoadPlan:
    sources = {"bf16": root / "bf16", "fp8": root / "fp8", "int4": root / "gptq-int4",
               "ctint4": root / "ct-w4a16", "ctfp8": root / "ct-fp8", **(extra or {})}  # fmt: skip
    body = {"sources": {k: str(v) for k, v in sources.items()}, "base": "bf16", "default": default,
            "dtype": "bfloat16", "rules": rules}  # fmt: skip
    path = tmp / f"recipe-{len(list(tmp.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return build_plan(load_recipe(path))


def assert_same_weights(a: LoadPlan, b: LoadPlan) -> None:
    wa, wb = dequantized_weights(a), dequantized_weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.parametrize(
    "default,rules,quantized",
    [
        ("bf16", [{"targets": EXPERTS, "source": "int4"}], {"experts": "ct_w4a16"}),
        ("fp8", [], {"experts": "ct_fp8", "linear": "ct_fp8"}),
        ("bf16", [{"targets": EXPERTS, "source": "ctint4"}], {"experts": "ct_w4a16"}),
        ("bf16", [{"targets": ATTENTION, "source": "ctfp8"}], {"linear": "ct_fp8"}),
    ],
    ids=["gptq-experts", "fp8-block", "ct-w4a16-experts", "ct-fp8-attention"],
)
def test_export_is_a_source_with_the_same_weights(root, tmp_path, default, rules, quantized) -> None:
    original = plan_of(root, tmp_path, default, rules)
    out = export(original, tmp_path / "out", shard_bytes=2**20, progress=False)
    again = plan_of(root, tmp_path, "exp", [], {"exp": out})
    formats = {p.layer.kind: p.format for p in again.layers if p.layer.quantizable}
    assert {k: v for k, v in formats.items() if v != UNQUANTIZED.name} == quantized
    assert_same_weights(original, again)


def test_ct_source_exports_bit_for_bit(root, tmp_path) -> None:
    plan = plan_of(root, tmp_path, "bf16", [{"targets": EXPERTS, "source": "ctint4"}])
    out = export(plan, tmp_path / "out", shard_bytes=2**20, progress=False)
    exported = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    source = {k: v for f in sorted((root / "ct-w4a16").glob("*.safetensors")) for k, v in load_file(f).items()}
    names = [n for n in source if ".mlp.experts." in n]
    assert names and all(torch.equal(exported[n], source[n]) for n in names)


def test_asymmetric_ct_member_exports_bit_for_bit() -> None:
    """compressed-tensors' compressor re-packs codes and zero points exactly."""
    from compressed_tensors.compressors import BaseCompressor  # noqa: F401 (the export needs it)

    qc = w4a16_config(64, symmetric=False)
    tensors = CT_W4A16.quantize(torch.randn(64, 256, dtype=torch.float64) * 0.05 + 0.01, qc)
    scheme = CT_W4A16.export_scheme(qc, "here")
    from compressed_tensors.quantization import QuantizationScheme

    group = QuantizationScheme(targets=["Linear"], weights=scheme.weights)
    group.format = "pack-quantized"
    out, same = CT_W4A16.export_member("m", tensors, qc, group, "here")
    assert same and set(out) == set(tensors)
    assert all(torch.equal(out[s].to(t.dtype), t) for s, t in tensors.items())


def test_mixed_scheme_export_is_refused_as_a_source(root, tmp_path) -> None:
    plan = plan_of(root, tmp_path, "bf16", [{"targets": EXPERTS, "source": "int4"}, {"targets": ATTENTION,
                                                                                      "source": "fp8"}])  # fmt: skip
    out = export(plan, tmp_path / "out", shard_bytes=2**20, progress=False)
    with pytest.raises(MixedError) as err:
        plan_of(root, tmp_path, "exp", [], {"exp": out})
    assert "its config_groups use different schemes" in str(err.value)
    assert "route the layers of each scheme from a checkpoint that holds only that scheme" in str(err.value)
