"""The installed ``vllm-mixed`` command end to end, in real processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open


def command() -> str:
    """The console script installed next to this interpreter."""
    script = Path(sys.executable).with_name("vllm-mixed")
    found = str(script) if script.is_file() else shutil.which("vllm-mixed")
    assert found, "vllm-mixed is not installed; run `make install`"
    return found


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([command(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("cli")
    return root / "tiny", run("make-tiny", str(root / "tiny"), cwd=root)


def test_make_tiny(made: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, proc = made
    assert proc.returncode == 0, proc.stderr
    printed = dict(line.split(None, 1) for line in proc.stdout.strip().splitlines())
    assert printed == {
        "bf16": str(root / "bf16"),
        "fp8": str(root / "fp8"),
        "gptq-int4": str(root / "gptq-int4"),
        "recipe": str(root / "recipe.yaml"),
    }
    for name in ("bf16", "fp8", "gptq-int4"):
        d = root / name
        for f in ("config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json"):
            assert (d / f).is_file(), d / f
        index = json.loads((d / "model.safetensors.index.json").read_text())
        names = set()
        for shard in sorted(d.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                names |= set(f.keys())
        assert names == set(index["weight_map"])


def test_plan_table_and_json(made: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    root, _ = made
    recipe = root / "recipe.yaml"
    proc = run("plan", str(recipe), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    data_proc = run("plan", str(recipe), "--json", cwd=tmp_path)
    assert data_proc.returncode == 0, data_proc.stderr
    data = json.loads(data_proc.stdout)

    lines = proc.stdout.splitlines()
    n_layers = 3 + 8 * json.loads((root / "bf16" / "config.json").read_text())["num_hidden_layers"]
    assert lines[0].startswith(
        f"recipe {recipe}: {n_layers} layers, {data['tensors']} tensors, base 'bf16', dtype bfloat16"
    )
    total = [line.split() for line in lines if line.startswith("total ")]
    assert len(total) == 1 and int(total[0][1]) == data["total_bytes"]
    for precision, nbytes in data["bytes_by_precision"].items():
        assert any(line.split()[:2] == [precision, str(nbytes)] for line in lines), precision
    for group in data["groups"]:
        row = [
            group["group"],
            group["source"],
            group["format"],
            group["precision"],
            str(group["layers"]),
            str(group["bytes"]),
        ]
        assert any(line.split()[:6] == row for line in lines), row
    for name, nbytes in data["pure_sources"].items():
        row = next(line.split() for line in lines if re.match(rf"{name}\s+{nbytes}\s", line))
        assert row[-1] == f"{data['total_bytes'] / nbytes:.3f}"
    assert data["bytes_by_precision"].keys() == {"bf16", "int4-g128"}
    assert data["total_bytes"] < data["pure_sources"]["bf16"]


def test_bad_input_exit_status_in_a_real_process(
    made: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    root, _ = made
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"sources:\n  a: {root / 'bf16'}\nbase: a\ndefault: b\n")
    proc = run("plan", str(recipe), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "default: 'b' is not a source; use one of: a" in proc.stderr


def test_pure_core_imports_no_vllm(tmp_path: Path) -> None:
    """recipe, sources, plan, formats, tiny and the CLI import no vLLM; the recipe not even torch."""
    code = (
        "import sys\n"
        "import vllm_mixed.recipe\n"
        "assert 'torch' not in sys.modules, 'recipe imported torch'\n"
        "import vllm_mixed, vllm_mixed.sources, vllm_mixed.plan, vllm_mixed.formats, vllm_mixed.tiny, vllm_mixed.cli\n"
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
