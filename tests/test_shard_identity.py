"""``compose`` records the identity (size, sha256 of the header bytes) of every
shard the plan reads; ``Composition.verified_plan`` (what the loader runs before
reading a byte of data) refuses a shard replaced since then, naming the file
and, where re-planning finds it, the tensor. No vLLM here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from vllm_mixed.compose import compose
from vllm_mixed.composition import Composition
from vllm_mixed.errors import MixedError
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.safetensors_header import ShardIdentity, shard_identity

FIX = "re-run `vllm-mixed compose RECIPE -o DIR`"
QWEIGHT = "model.layers.1.mlp.experts.{}.up_proj.qweight"


def composed(tiny: Any, tmp_path: Path) -> tuple[dict[str, Any], Composition]:
    """The quantization_config compose writes for the make-tiny mix, and the
    composition vLLM builds from it."""
    out = compose(build_plan(load_recipe(tiny.recipe_path)), tmp_path / "composed")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    return qc, Composition.from_dict(qc)


def header_sha256(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[: 8 + n]).hexdigest()


def swap_offsets(shard: Path, a: str, b: str) -> None:
    """Swap where two same-shaped tensors' data is, in the header only: same
    size, same names, dtypes and shapes, a valid file, other weights."""
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    data[8 : 8 + n] = text + b" " * (n - len(text))
    shard.write_bytes(bytes(data))


def test_compose_records_each_shard_the_plan_reads(tiny: Any, tmp_path: Path) -> None:
    plan = build_plan(load_recipe(tiny.recipe_path))
    qc, comp = composed(tiny, tmp_path)
    read = {Path(t.file) for p in plan.layers for t in p.tensors}
    for name, entry in qc["sources"].items():
        shards = entry["files"]
        assert {Path(entry["path"]) / f for f in shards} == {f for f in read if f.parent == Path(entry["path"])}
        for fname, ident in shards.items():
            path = Path(entry["path"]) / fname
            assert ident == {"bytes": path.stat().st_size, "header_sha256": header_sha256(path)}
            assert comp.sources[name].files[fname] == ShardIdentity(ident["bytes"], ident["header_sha256"])
    assert qc["sources"]["fp8"]["files"] == {}  # in the recipe, but no layer is read from it
    assert len(qc["sources"]["int4"]["files"]) == len(tiny.shards("int4"))
    assert comp.to_dict() == qc


def test_unchanged_shards_pass_whatever_their_mtime(tiny: Any, tmp_path: Path) -> None:
    """A copy (new mtime, same bytes) is the same shard: no mtime is recorded."""
    _, comp = composed(tiny, tmp_path)
    for shard in tiny.shards("int4"):
        shard.write_bytes(shard.read_bytes())
        os.utime(shard, (1, 1))
    assert comp.changed_files() == []
    plan = comp.verified_plan()
    assert {p.layer.name: (p.source, p.format) for p in plan.layers} == comp.layers


def replace(tiny: Any, how: str) -> tuple[Path, list[str]]:
    """Replace one int4 shard; returns it and what the error must say."""
    shard = tiny.shard_of("int4", QWEIGHT.format(0))
    before = shard.stat().st_size
    if how == "other-source":
        shutil.copyfile(tiny.shards("bf16")[0], shard)
        # the first int4 tensor the plan looks up in it, in model order
        return shard, [
            f": it was {before} bytes at compose, now {shard.stat().st_size}; the index lists tensor "
            "'model.layers.0.mlp.experts.0.gate_proj.qweight' in this shard but its header does not",
        ]
    if how == "reshaped":
        tensors = load_file(shard)
        tensors[QWEIGHT.format(0)] = tensors[QWEIGHT.format(0)][:-1].clone()
        save_file(tensors, shard, metadata={"format": "pt"})
        return shard, [f"; tensor {QWEIGHT.format(0)!r} has shape ["]
    if how == "swapped":
        swap_offsets(shard, QWEIGHT.format(0), QWEIGHT.format(1))
        assert shard.stat().st_size == before
        return shard, [": its safetensors header changed (sha256 ", "so a tensor was added, removed, renamed"]
    shard.unlink()
    return shard, [": the file is missing; ", "download the missing shard"]


@pytest.mark.parametrize("how", ["other-source", "reshaped", "swapped", "deleted"])
def test_replaced_shard_is_refused(tiny: Any, tmp_path: Path, how: str) -> None:
    _, comp = composed(tiny, tmp_path)
    shard, expected = replace(tiny, how)
    assert [p for p, _ in comp.changed_files()] == [shard]
    with pytest.raises(MixedError) as failed:
        comp.verified_plan()
    msg = str(failed.value)
    assert msg.startswith(f"{shard}: replaced or modified since `vllm-mixed compose`: "), msg
    for part in expected:
        assert part in msg
    assert "Restore the shard compose read" in msg and FIX in msg


def test_swapped_offsets_pass_every_other_check(tiny: Any, tmp_path: Path) -> None:
    """Why the identity exists: this file is valid and plans fine, yet two
    experts would be served each other's weights."""
    _, comp = composed(tiny, tmp_path)
    swap_offsets(tiny.shard_of("int4", QWEIGHT.format(0)), QWEIGHT.format(0), QWEIGHT.format(1))
    build_plan(comp.recipe)
    with pytest.raises(MixedError, match="its safetensors header changed"):
        comp.verified_plan()


def test_only_shards_the_plan_reads_are_checked(tiny: Any, tmp_path: Path) -> None:
    qc, comp = composed(tiny, tmp_path)
    recorded = [tiny.src("bf16") / f for f in sorted(qc["sources"]["bf16"]["files"])]
    unread = [s for s in tiny.shards("bf16") if s not in recorded]  # BF16 experts: the mix takes them from int4
    assert len(recorded) >= 2 and unread
    for shard in unread:
        shard.write_bytes(shard.read_bytes() + b"\0" * 8)
    comp.check_files()
    for shard in recorded:
        shard.write_bytes(shard.read_bytes() + b"\0" * 8)
    with pytest.raises(MixedError) as failed:
        comp.check_files()
    msg = str(failed.value)
    assert msg.startswith(f"{recorded[0]}: replaced or modified since `vllm-mixed compose`")
    assert f"(and {len(recorded) - 1} more changed shards)" in msg


@pytest.mark.parametrize("form", ["no-files-key", "recipe-path"])
def test_compositions_without_identities_skip_the_check(tiny: Any, tmp_path: Path, form: str) -> None:
    """Compositions written before identities were recorded, and the
    ``{"quant_method": "mixed", "recipe": PATH}`` form of --hf-overrides."""
    qc, recorded = composed(tiny, tmp_path)
    if form == "no-files-key":
        for entry in qc["sources"].values():
            del entry["files"]
        comp = Composition.from_dict(qc)
    else:
        comp = Composition.from_dict({"quant_method": "mixed", "recipe": str(tiny.recipe_path)})
    assert all(s.files is None for s in comp.sources.values())
    assert comp == recorded  # identities are provenance, not part of what is served
    assert '"files"' not in json.dumps(comp.to_dict())
    swap_offsets(tiny.shard_of("int4", QWEIGHT.format(0)), QWEIGHT.format(0), QWEIGHT.format(1))
    assert comp.changed_files() == []
    comp.verified_plan()


@pytest.mark.parametrize(
    "files",
    [
        [1, 2],
        {"model-00001-of-00002.safetensors": {"bytes": "12"}},
        {"model-00001-of-00002.safetensors": {"bytes": 12, "header_sha256": None}},
        {"../../etc/passwd": {"bytes": 12, "header_sha256": "ab"}},
    ],
)
def test_malformed_identities_are_a_clear_error(tiny: Any, tmp_path: Path, files: Any) -> None:
    qc, _ = composed(tiny, tmp_path)
    qc["sources"]["int4"]["files"] = files
    with pytest.raises(MixedError, match=r"quantization_config 'mixed' is malformed .*re-run `vllm-mixed compose`"):
        Composition.from_dict(qc)


def test_shard_identity_of_damaged_and_missing_files(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    assert shard_identity(short) == ShardIdentity(2, hashlib.sha256(b"\x01\x02").hexdigest())
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(struct.pack("<Q", 10**15) + b"{}")  # never allocates what the length claims
    assert shard_identity(forged).nbytes == 10
    assert shard_identity(tmp_path / "nope.safetensors") is None
