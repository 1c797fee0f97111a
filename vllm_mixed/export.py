"""``export``: one merged checkpoint in the compressed-tensors format, which
stock vLLM serves without this plugin.

The composed directory (``compose``) needs the plugin and the three source
checkpoints at serve time; an exported directory needs neither. Each layer is
written in the compressed-tensors form of its routed format, converted without
re-rounding anything:

- GPTQ int4 (v1, symmetric) becomes ``pack-quantized`` W4A16 (group strategy,
  the source's group size): the int4 codes keep their bits (compressed-tensors
  packs ``q - 8`` eight to an int32 along the input dimension, lowest nibble
  first, which is exactly GPTQ's ``qweight`` transposed) and ``scales`` [K/g, N]
  becomes ``weight_scale`` [N, K/g] in its source dtype;
- FP8 block becomes ``float-quantized`` (strategy ``block``, dynamic fp8
  ``group`` input activations, as vLLM runs block FP8): ``weight`` keeps its fp8
  bits and ``weight_scale_inv`` becomes ``weight_scale`` in its source dtype;
- unquantized layers are cast to the recipe dtype and listed in ``ignore``.

The compressed-tensors package does the format itself: its own config classes
(``QuantizationConfig``, ``QuantizationScheme``, ``QuantizationArgs``), its
format inference and compressors (``compress``), and ``ModelCompressor`` to
write ``quantization_config``. The compressors quantize a float weight with a
given scale; we hand them the source weight decoded in float64, where every
product code x scale is exact, so quantizing it gives back the source codes.
That identity is checked for every tensor: a mismatch stops the export.

Tensors stream layer by layer from the sources (each file opened once per
layer with ``safe_open``) into shards of about ``shard_bytes``: memory stays
near one shard (twice that while safetensors serializes it).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_mixed.compose import BASE_FILES
from vllm_mixed.errors import MixedError
from vllm_mixed.formats import FORMATS
from vllm_mixed.formats.fp8_block import block_size
from vllm_mixed.plan import LoadPlan, PlannedLayer
from vllm_mixed.safetensors_header import TensorInfo

__all__ = ["DEFAULT_SHARD_BYTES", "cmd_export", "export"]

DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's usual "5GB"
INDEX = "model.safetensors.index.json"
ALWAYS_IGNORED = ("lm_head", "re:.*mlp[.]gate$")  # head and MoE routers stay unquantized
GPTQ_SYM_ZEROS = 0x77777777  # v1 stores zero point - 1: eight nibbles of 7 is zero point 8
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class _Group:
    """One compressed-tensors config group: the scheme (without targets) of
    every layer routed to a format with these parameters."""

    format: str
    weights: QuantizationArgs
    input_activations: QuantizationArgs | None = None

    @property
    def key(self) -> str:
        inputs = self.input_activations.model_dump_json() if self.input_activations else ""
        return f"{self.format}|{self.weights.model_dump_json()}|{inputs}"


def _gptq_group(qc: dict[str, Any], where: str) -> _Group:
    if not qc.get("sym", True):
        raise MixedError(
            f"{where}: GPTQ with sym: false is not exported; vLLM's pack-quantized W4A16 here is symmetric "
            "(zero point 8). Route these layers to a symmetric GPTQ checkpoint, or to the bf16/fp8 source"
        )
    weights = QuantizationArgs(
        num_bits=4, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP,
        group_size=int(qc["group_size"]), symmetric=True, dynamic=False,
    )  # fmt: skip
    return _Group("gptq_int4", weights)


def _fp8_group(qc: dict[str, Any], where: str) -> _Group:
    bn, bk = block_size(qc)
    weights = QuantizationArgs(
        num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.BLOCK,
        block_structure=[bn, bk], symmetric=True, dynamic=False,
    )  # fmt: skip
    # vLLM's block FP8 GEMM quantizes activations per token and per group of bk
    inputs = QuantizationArgs(
        num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.GROUP,
        group_size=bk, symmetric=True, dynamic=True,
    )  # fmt: skip
    return _Group("fp8_block", weights, inputs)


# A member converter gets the module name, its source tensors (by suffix), the
# source's quantization_config, the scheme and where the source is; it returns
# the compressed tensors and whether the source codes came through bit for bit.
# It hands the compressor the source weight decoded in float64, where code x
# scale is exact (int4 x fp16 needs 15 significant bits, fp8 x fp32 28; 53 there).
Tensors = dict[str, torch.Tensor]
Converter = Callable[[str, Tensors, "dict[str, Any] | None", QuantizationScheme, str], tuple[Tensors, bool]]


def _gptq_to_packed(
    name: str, t: Tensors, qc: dict[str, Any] | None, scheme: QuantizationScheme, where: str
) -> tuple[Tensors, bool]:
    qweight, scales, g_idx = t["qweight"], t["scales"], t.get("g_idx")
    if not bool((t["qzeros"] == GPTQ_SYM_ZEROS).all()):
        raise MixedError(
            f"{where}: tensor {name}.qzeros is not all 0x77777777 (zero point 8), although the checkpoint declares "
            "sym: true; it is asymmetric or damaged: fix its config.json, or route the layer to another source"
        )
    k, group = qweight.shape[0] * 8, scheme.weights.group_size
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // group):
        raise MixedError(
            f"{where}: tensor {name}.g_idx is not arange(in) // {group} (act-order GPTQ); pack-quantized has no "
            "column permutation: route the layer to a desc_act: false checkpoint"
        )
    state = {"weight": FORMATS["gptq_int4"].dequantize(t, qc, torch.float64), "weight_scale": scales.t().contiguous()}
    out = _compressor(scheme).compress(state, scheme)
    return out, torch.equal(out["weight_packed"], qweight.t())  # both: q in 0..15, 8 per word along in, low first


def _fp8_to_float(
    name: str, t: Tensors, qc: dict[str, Any] | None, scheme: QuantizationScheme, where: str
) -> tuple[Tensors, bool]:
    state = {"weight": FORMATS["fp8_block"].dequantize(t, qc, torch.float64), "weight_scale": t["weight_scale_inv"]}
    out = _compressor(scheme).compress(state, scheme)
    return out, torch.equal(out["weight"].view(torch.uint8), t["weight"].view(torch.uint8))


# format -> (its config group from the source's quantization_config, its member converter)
_EXPORTERS: dict[str, tuple[Callable[[dict[str, Any], str], _Group], Converter]] = {
    "gptq_int4": (_gptq_group, _gptq_to_packed),
    "fp8_block": (_fp8_group, _fp8_to_float),
}


def _compressor(scheme: QuantizationScheme) -> type[BaseCompressor]:
    return BaseCompressor.get_value_from_registry(scheme.format)


def _targets(layers: Iterable[PlannedLayer], num_layers: int) -> list[str]:
    """compressed-tensors targets naming exactly the checkpoint modules of
    ``layers``, compactly: decoder-layer indices become ``\\d+`` (all layers)
    or an alternation, expert indices ``\\d+``. Both compressed-tensors and
    vLLM match ``re:`` targets with ``re.match``; each ends with ``$``."""
    by_template: dict[tuple[str, ...], set[int]] = defaultdict(set)
    exact: list[str] = []
    for p in layers:
        for m in p.layer.members:
            parts = m.name.split(".")
            digits = [i for i, s in enumerate(parts) if s.isdigit()]
            if not digits:
                exact.append(m.name)
                continue
            tmpl = tuple(
                "{L}" if i == digits[0] else r"\d+" if i in digits else re.escape(s) for i, s in enumerate(parts)
            )
            by_template[tmpl].add(int(parts[digits[0]]))
    merged: dict[tuple[tuple[str, ...], frozenset[int]], list[str]] = defaultdict(list)
    for tmpl, indices in by_template.items():
        merged[(tmpl[:-1], frozenset(indices))].append(tmpl[-1])
    out = list(dict.fromkeys(exact))
    for (prefix, indices), lasts in merged.items():
        every = indices == frozenset(range(num_layers))
        layer_re = r"\d+" if every else "(?:" + "|".join(str(i) for i in sorted(indices)) + ")"
        head = "[.]".join(layer_re if s == "{L}" else s for s in prefix)
        last = lasts[0] if len(lasts) == 1 else "(?:" + "|".join(lasts) + ")"
        out.append(f"re:{head}[.]{last}$")
    return out


def _plan_groups(plan: LoadPlan) -> tuple[dict[str, QuantizationScheme], QuantizationConfig | None]:
    """Each quantized layer's scheme by layer name, and the whole
    ``QuantizationConfig`` (``None`` when nothing is routed to a quantized format)."""
    groups_by_key: dict[str, _Group] = {}
    members: dict[str, list[PlannedLayer]] = defaultdict(list)
    unquantized: list[PlannedLayer] = []
    for p in plan.layers:
        if p.format == "unquantized":
            if p.layer.quantizable:
                unquantized.append(p)
            continue
        if p.format not in _EXPORTERS:
            raise MixedError(
                f"layer {p.layer.name!r} is {p.format} in source {p.source!r}, which export cannot write; "
                f"exportable: unquantized, {', '.join(sorted(_EXPORTERS))}"
            )
        src = plan.sources[p.source]
        group = _EXPORTERS[p.format][0](src.quant_config or {}, src.where)
        groups_by_key.setdefault(group.key, group)
        members[group.key].append(p)
    if not members:
        return {}, None
    num_layers = int(plan.base.config.get("num_hidden_layers") or 0)
    groups: dict[str, QuantizationScheme] = {}
    routed: dict[str, QuantizationScheme] = {}
    for i, (key, layers) in enumerate(members.items()):
        group = groups_by_key[key]
        scheme = QuantizationScheme(
            targets=_targets(layers, num_layers), weights=group.weights, input_activations=group.input_activations
        )
        scheme.format = infer_module_format(torch.nn.Linear, scheme).value  # the library's own choice
        groups[f"group_{i}"] = scheme
        routed.update(dict.fromkeys((p.layer.name for p in layers), scheme))
    formats = {s.format for s in groups.values()}
    config = QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=[*ALWAYS_IGNORED, *_targets(unquantized, num_layers)],
    )
    return routed, config


class _ShardWriter:
    """Buffers tensors up to ``shard_bytes`` and writes each full shard under
    a temporary name; ``finish`` gives the shards their final
    ``model-0000i-of-0000n`` names and writes the index."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
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
        if not self.buffer:
            return
        path = self.out / f"model-{len(self.written) + 1:05d}.safetensors.partial"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.written)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for path, _ in self.written:
            path.unlink(missing_ok=True)


def _read(handles: ExitStack, opened: dict[Path, Any], info: TensorInfo) -> torch.Tensor:
    """One planned tensor, checked against the header the plan saw."""
    fix = "the source changed since it was planned; restore it (re-download) and export again"
    try:
        if info.file not in opened:
            opened[info.file] = handles.enter_context(safe_open(str(info.file), framework="pt"))
        t = opened[info.file].get_tensor(info.name)
    except (SafetensorError, OSError) as exc:
        raise MixedError(f"{info.file}: cannot read tensor {info.name!r} ({exc}); {fix}") from None
    if tuple(t.shape) != info.shape:
        raise MixedError(
            f"{info.file}: tensor {info.name!r} has shape {list(t.shape)}, planned {list(info.shape)}; {fix}"
        )
    return t


def _check_exact(
    member: str, p: PlannedLayer, file: Path, converted: dict[str, torch.Tensor], same: bool, scheme: QuantizationScheme
) -> None:
    """Stop unless the compressor kept the source codes and wrote exactly the
    tensors it declares for the scheme."""
    expected = sorted(_compressor(scheme).compression_param_names(scheme))
    problem = (
        None if same and sorted(converted) == expected
        else f"tensors {sorted(converted)} where the scheme declares {expected}" if same
        else "codes that differ from the source's"
    )  # fmt: skip
    if problem:
        raise MixedError(
            f"compressed-tensors turned {member!r} of source {p.source!r} ({file}) into {problem}; the export would "
            "not be exact. Either the source has zero or non-finite scales (check it), or this compressed-tensors "
            "version writes another layout (export was written against 0.17)"
        )


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MixedError(f"{out}: is a file; pass a new or empty directory to export into")
    found = sorted(p.name for p in out.glob("*.safetensors*")) if out.is_dir() else []  # shards, index, .partial
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise MixedError(
            f"{out}: already holds a checkpoint ({shown}); export never overwrites weights: "
            "choose a new or empty directory, or remove those files"
        )


def export(plan: LoadPlan, out_dir: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Write the merged compressed-tensors checkpoint of a validated plan."""
    out = Path(out_dir)
    _check_out(out)
    if shard_bytes <= 0:
        raise MixedError(f"shard size {shard_bytes} is not positive; pass a size such as 5GB")
    missing = [p.layer.name for p in plan.layers if not p.tensors]
    if missing:
        raise MixedError(
            f"the plan has no tensors for {missing[0]!r} (and {len(missing) - 1} more layers): it was built with "
            "read_headers=False; build it with build_plan(recipe) to export"
        )
    dtype = _TORCH[plan.recipe.dtype]
    routed, qconfig = _plan_groups(plan)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, shard_bytes)
    bar = tqdm(
        total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="export", disable=not progress
    )
    try:
        for p in plan.layers:
            src = plan.sources[p.source]
            by_member: dict[str, list[TensorInfo]] = defaultdict(list)
            for info in p.tensors:
                by_member[info.name.rpartition(".")[0]].append(info)
            with ExitStack() as handles:
                opened: dict[Path, Any] = {}
                for member, infos in by_member.items():
                    tensors = {i.name.rpartition(".")[2]: _read(handles, opened, i) for i in infos}
                    if p.format == "unquantized":
                        converted = {k: v.to(dtype) for k, v in tensors.items()}
                    else:
                        scheme = routed[p.layer.name]
                        converted, same = _EXPORTERS[p.format][1](member, tensors, src.quant_config, scheme, src.where)
                        _check_exact(member, p, infos[0].file, converted, same, scheme)
                    for suffix, t in converted.items():
                        writer.add(f"{member}.{suffix}", t)
                    bar.update(sum(i.nbytes for i in infos))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    _write_config(plan, out, qconfig)
    for name in BASE_FILES:
        if (plan.base.path / name).is_file():
            shutil.copyfile(plan.base.path / name, out / name)
    return out


def _write_config(plan: LoadPlan, out: Path, qconfig: QuantizationConfig | None) -> None:
    """The base's config.json with the recipe dtype; ``quantization_config``
    is written by compressed-tensors' own ``ModelCompressor.update_config``."""
    config = dict(plan.base.config)
    config.pop("quantization_config", None)
    config["torch_dtype"] = plan.recipe.dtype
    if "dtype" in config:
        config["dtype"] = plan.recipe.dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if qconfig is not None:
        ModelCompressor(quantization_config=qconfig).update_config(str(out))


def cmd_export(args: argparse.Namespace) -> int:
    """``vllm-mixed export RECIPE -o DIR [--shard-size 5GB]`` (arguments
    defined in :mod:`vllm_mixed.cli`, which imports this module lazily)."""
    from vllm_mixed.cli import human
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe

    plan = build_plan(load_recipe(args.recipe))
    out = export(plan, args.output, shard_bytes=getattr(args, "shard_size", DEFAULT_SHARD_BYTES))
    index = json.loads((out / INDEX).read_text())
    shards = len(set(index["weight_map"].values()))
    print(f"exported {out}: {human(index['metadata']['total_size'])} in {shards} shards (compressed-tensors)")
    by_precision = sorted(plan.bytes_by_precision().items())
    width = max(len(prec) for prec, _ in by_precision)
    for prec, nbytes in by_precision:
        print(f"  {prec:{width}s}  {human(nbytes)} read from the sources")
    print(f"serve it with stock vLLM: vllm serve {out}")
    return 0
