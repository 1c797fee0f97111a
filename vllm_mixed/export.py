"""``export``: one merged checkpoint in the compressed-tensors format, which
stock vLLM serves without this plugin.

The composed directory (``compose``) needs the plugin and the source
checkpoints at serve time; an exported directory needs neither. Each layer is
written in the compressed-tensors form of its routed format, converted without
re-rounding anything: each format's module gives its config group
(``Format.export_scheme``) and converts its members (``Format.export_member``);
unquantized layers are cast to the recipe dtype and listed in ``ignore``.

The compressed-tensors package does the format itself: its own config classes
(``QuantizationConfig``, ``QuantizationScheme``, ``QuantizationArgs``), its
format inference and compressors (``compress``), and ``ModelCompressor`` to
write ``quantization_config``. The compressors quantize a float weight with a
given scale; the formats hand them the source weight decoded in float64, where
every product code x scale is exact (int4 x fp16 needs 15 significant bits,
fp8 x fp32 28; 53 there), so quantizing it gives back the source codes. That
identity is checked for every tensor: a mismatch stops the export.

Tensors stream layer by layer from the sources (each file opened once per
layer with ``safe_open``) into shards of about ``shard_bytes``: memory stays
near one shard (twice that while safetensors serializes it).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from vllm_mixed.checkpoint_writer import ShardWriter
from vllm_mixed.compose import BASE_FILES
from vllm_mixed.errors import MixedError
from vllm_mixed.formats import FORMATS, Format
from vllm_mixed.formats.base import ExportScheme
from vllm_mixed.plan import LoadPlan, PlannedLayer
from vllm_mixed.safetensors_header import TensorInfo

__all__ = ["DEFAULT_SHARD_BYTES", "export", "plan_schemes"]

DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's usual "5GB"
ALWAYS_IGNORED = ("lm_head", "re:.*mlp[.]gate$")  # head and MoE routers stay unquantized
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}


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


def plan_schemes(plan: LoadPlan) -> tuple[dict[str, QuantizationScheme], QuantizationConfig | None]:
    """Each quantized layer's scheme by layer name, and the whole
    ``QuantizationConfig`` (``None`` when nothing is routed to a quantized format)."""
    groups_by_key: dict[str, ExportScheme] = {}
    members: dict[str, list[PlannedLayer]] = defaultdict(list)
    unquantized: list[PlannedLayer] = []
    for p in plan.layers:
        fmt = p.fmt
        if not fmt.quantized:
            if p.layer.quantizable:
                unquantized.append(p)
            continue
        if not _exportable(fmt):
            exportable = ", ".join(sorted(f.name for f in FORMATS.values() if not f.quantized or _exportable(f)))
            raise MixedError(
                f"layer {p.layer.name!r} is {p.format} in source {p.source!r}, which export cannot write; "
                f"exportable: {exportable}"
            )
        src = plan.sources[p.source]
        group = fmt.export_scheme(src.quant_config or {}, src.where)
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


def _exportable(fmt: Format) -> bool:
    """Whether a format has an exporter (overrides ``Format.export_scheme``)."""
    return type(fmt).export_scheme is not Format.export_scheme


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
    expected = sorted(BaseCompressor.get_value_from_registry(scheme.format).compression_param_names(scheme))
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
    routed, qconfig = plan_schemes(plan)
    writer = ShardWriter(out, shard_bytes)
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
                    bias = {"bias": tensors.pop("bias").to(dtype)} if "bias" in tensors else {}  # float everywhere
                    if not p.fmt.quantized:
                        converted = {k: v.to(dtype) for k, v in tensors.items()}
                    else:
                        scheme = routed[p.layer.name]
                        converted, same = p.fmt.export_member(member, tensors, src.quant_config, scheme, src.where)
                        _check_exact(member, p, infos[0].file, converted, same, scheme)
                    converted = {**converted, **bias}
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
