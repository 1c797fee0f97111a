"""The recipe and the composed ``config.json`` are data only: no YAML tag
constructs anything, no path is expanded by a shell or the environment,
nothing from a file is imported, evaluated or unpickled, and every source
path is resolved and reported absolute.

Covered elsewhere, not repeated here: a source that is a file
(``test_bad_input.test_source_is_a_file``), a pickle that would run code on
unpickling (``test_bad_input.test_pickle_only_checkpoint``), ``~``/``$VAR``
kept literal when a recipe is parsed and relative paths resolved against the
recipe's directory (``test_recipe.test_paths_are_data_not_expanded``,
``test_recipe.test_relative_sources_resolve_against_recipe_directory``)."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import vllm_mixed
from vllm_mixed.cli import main
from vllm_mixed.composition import Composition
from vllm_mixed.errors import MixedError
from vllm_mixed.recipe import load_recipe

PACKAGE = Path(vllm_mixed.__file__).parent


def plan_fails(capsys: pytest.CaptureFixture[str], recipe: Path) -> str:
    rc = main(["plan", str(recipe)])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    return err


@pytest.fixture
def no_exec(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every way to run a command or unpickle raises (and is recorded)."""
    calls: list[Any] = []

    def refuse(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args))
            raise AssertionError(f"{name} called with {args!r}")

        return call

    for mod, attr in [
        (os, "system"), (os, "popen"), (os, "execv"), (os, "execvp"), (subprocess, "Popen"),
        (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
    ]:  # fmt: skip
        monkeypatch.setattr(mod, attr, refuse(f"{mod.__name__}.{attr}"))
    return calls


# --- YAML: tags are refused, nothing is constructed --------------------------------


@pytest.mark.parametrize(
    "body,tag",
    [
        ('sources: !!python/object/apply:os.system ["touch {marker}"]\nbase: a\n', "!!python/object/apply:os.system"),
        ("sources:\n  a: !!python/name:os.system\nbase: a\n", "!!python/name:os.system"),
        ('sources:\n  a: !!python/object/new:subprocess.Popen [["touch", "{marker}"]]\nbase: a\n', None),
        ("sources: {{a: x}}\nbase: !!python/module:os\n", "!!python/module:os"),
        ('sources: {{a: x}}\nbase: a\nrules:\n  - !!python/object:builtins.dict {{targets: ["x"], source: a}}\n', None),
        ("sources:\n  a: !custom_tag x\nbase: a\n", "!custom_tag"),
    ],
)
def test_yaml_tags_are_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_exec: list[Any],
    body: str,
    tag: str | None,
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(body.format(marker=marker))
    err = plan_fails(capsys, recipe)
    assert f"recipe {recipe}: YAML tag '{tag or '!!python/'}" in err
    assert "is not allowed; a recipe is plain data" in err and "Remove the tag" in err
    assert not marker.exists() and no_exec == []


def test_binary_tag_is_not_a_path(tmp_path: Path) -> None:
    """``!!binary`` is safe YAML but bytes, not a path: it would skip
    resolution against the recipe's directory, so it is refused."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources:\n  a: !!binary Y2twdA==\nbase: a\n")
    with pytest.raises(MixedError) as failed:
        load_recipe(recipe)
    assert f"recipe {recipe}: sources.a: Input should be a valid string (got b'ckpt')" in str(failed.value)


def test_alias_bomb_is_a_short_error(tmp_path: Path) -> None:
    """Aliases share one object in memory; the error must not print 9**8 strings."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 8)]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join([*lines, "sources: {a: x}", "base: a", "dtype: *l7", "rules: *l7", ""]))
    start = time.perf_counter()
    with pytest.raises(MixedError) as failed:
        load_recipe(recipe)
    msg = str(failed.value)
    assert time.perf_counter() - start < 10
    assert len(msg) < 5000, len(msg)
    assert "dtype: [[[...], [...], [...]" in msg and "is not supported" in msg
    assert "unknown key 'l7'" in msg


def test_deep_nesting_is_a_clear_error(tmp_path: Path) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("sources: {a: x}\nbase: a\ndtype: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(MixedError, match=f"recipe {recipe}: nested too deeply to be a recipe"):
        load_recipe(recipe)


# --- paths: literal, resolved against the recipe, reported absolute -----------------


@pytest.mark.parametrize(
    "value",
    ["~/bf16", "$HOME/bf16", "${HOME}/bf16", "$(touch {marker})", "`touch {marker}`", "bf16; touch {marker}"],
)
def test_shell_syntax_in_a_source_path_is_literal(
    tiny_ro: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_exec: list[Any],
    value: str,
) -> None:
    """With HOME at the tiny model, any expansion would find a real
    checkpoint; instead the literal path (under the recipe's directory) is
    reported missing and no command runs."""
    monkeypatch.setenv("HOME", str(tiny_ro.root))
    monkeypatch.chdir(tiny_ro.root)  # a relative `bf16` here would also be a real checkpoint
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    marker = tmp_path / "PWNED"
    value = value.replace("{marker}", str(marker))
    recipe = recipes / "r.yaml"
    recipe.write_text(yaml.safe_dump({"sources": {"a": value}, "base": "a"}))
    err = plan_fails(capsys, recipe)
    literal = (recipes / value).resolve()
    assert f"source 'a' ({literal}): directory does not exist" in err
    assert "fix the path under 'sources:' in the recipe" in err
    assert not marker.exists() and not (recipes / "PWNED").exists() and no_exec == []


def test_relative_sources_are_reported_absolute(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The make-tiny recipe names its sources relatively (``bf16``,
    ``gptq-int4``): ``plan`` and the composed config.json give the absolute
    paths they resolved to, whatever the working directory."""
    assert yaml.safe_load(tiny.recipe_path.read_text())["sources"]["int4"] == "gptq-int4"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = {name: str(tiny.src(name).resolve()) for name in ("bf16", "fp8", "int4")}

    assert main(["plan", "--json", os.path.relpath(tiny.recipe_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {n: s["path"] for n, s in summary["sources"].items()} == expected
    assert summary["recipe"]["sources"] == expected

    assert main(["plan", str(tiny.recipe_path)]) == 0
    table = capsys.readouterr().out
    for path in expected.values():
        assert path in table

    assert main(["compose", str(tiny.recipe_path), "-o", "composed"]) == 0
    capsys.readouterr()
    qc = json.loads((elsewhere / "composed" / "config.json").read_text())["quantization_config"]
    assert {n: s["path"] for n, s in qc["sources"].items()} == expected
    assert qc["recipe"]["sources"] == expected
    assert all(Path(p).is_absolute() for p in expected.values())


# --- the composed config.json: nothing in it names code ----------------------------


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module on sys.path that leaves a marker if anything imports it."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "vllm_mixed_probe.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("vllm_mixed_probe", None)
    return "vllm_mixed_probe", marker


def composed_config(tiny_ro: Any, tmp_path: Path) -> dict[str, Any]:
    from vllm_mixed.compose import compose
    from vllm_mixed.plan import build_plan

    out = compose(build_plan(load_recipe(tiny_ro.recipe())), tmp_path / "composed")
    return json.loads((out / "config.json").read_text())["quantization_config"]


def test_unexpected_keys_in_the_composed_config_are_inert(
    tiny_ro: Any, tmp_path: Path, probe: tuple[str, Path], no_exec: list[Any]
) -> None:
    name, marker = probe
    qc = composed_config(tiny_ro, tmp_path)
    plain = Composition.from_dict(qc)
    hostile = {**qc, "import": name, "module": name, "class": f"{name}.Boom", "__reduce__": [name, "x"]}
    hostile["sources"] = {n: {**s, "module": name, "loader": f"{name}:load"} for n, s in qc["sources"].items()}
    assert Composition.from_dict(hostile) == plain
    assert not marker.exists() and name not in sys.modules and no_exec == []


@pytest.mark.parametrize("method", ["vllm_mixed_probe", "os.system", "pickle", "mixed.vllm_mixed_probe", ""])
def test_other_quant_methods_are_refused(probe: tuple[str, Path], no_exec: list[Any], method: str) -> None:
    name, marker = probe
    with pytest.raises(MixedError) as failed:
        Composition.from_dict({"quant_method": method, "recipe": {"module": name}})
    assert f"but the model's quantization_config is a {method.lower() or 'plain'!r} checkpoint config" in str(
        failed.value
    )
    assert not marker.exists() and name not in sys.modules and no_exec == []


@pytest.mark.parametrize(
    "where,value",
    [
        ("format", "vllm_mixed_probe"),
        ("format", "os.system"),
        ("layer-format", "vllm_mixed_probe"),
        ("layer-source", "x"),
    ],
)
def test_formats_and_routes_must_be_known(
    tiny_ro: Any, tmp_path: Path, probe: tuple[str, Path], where: str, value: str
) -> None:
    """Formats are keys of fixed tables (never names of code): anything else
    is refused when the config is read, before vLLM builds a layer."""
    name, marker = probe
    qc = composed_config(tiny_ro, tmp_path)
    if where == "format":
        qc["sources"]["int4"]["format"] = value
    else:
        layer = qc["layers"]["model.layers.0.mlp.experts"]
        layer["format" if where == "layer-format" else "source"] = value
    with pytest.raises(MixedError) as failed:
        Composition.from_dict(qc)
    assert "quantization_config 'mixed' is malformed" in str(failed.value)
    assert repr(value) in str(failed.value) and "re-run `vllm-mixed compose`" in str(failed.value)
    assert not marker.exists() and name not in sys.modules


def test_recipe_path_in_the_config_is_parsed_as_data(tmp_path: Path, no_exec: list[Any]) -> None:
    """The ``{"recipe": PATH}`` form (--hf-overrides) reads the file as a recipe."""
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'sources: !!python/object/apply:os.system ["touch {tmp_path / "PWNED"}"]\nbase: a\n')
    with pytest.raises(MixedError, match=f"recipe {evil}: YAML tag '!!python/object/apply:os.system'"):
        Composition.from_dict({"quant_method": "mixed", "recipe": str(evil)})
    assert not (tmp_path / "PWNED").exists() and no_exec == []


# --- pickle checkpoints: refused without being opened ------------------------------


@pytest.mark.parametrize(
    "files",
    [
        ["pytorch_model.bin"],
        ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"],
        ["model.pt"],
    ],
)
def test_pickle_only_checkpoint_is_never_unpickled(
    tiny_ro: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_exec: list[Any], files: list[str]
) -> None:
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(tiny_ro.src("bf16") / "config.json", ckpt)
    for f in files:
        (ckpt / f).write_bytes(pickle.dumps({"weight": [1.0]}) if not f.endswith(".json") else b'{"weight_map": {}}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"sources": {"pt": str(ckpt)}, "base": "pt", "default": "pt"}))
    err = plan_fails(capsys, recipe)
    assert f"source 'pt' ({ckpt}): holds only PyTorch pickle weights ({files[0]}" in err
    assert "never unpickles" in err
    assert no_exec == []


def test_index_naming_a_pickle_shard_is_read_as_safetensors(
    tiny: Any, capsys: pytest.CaptureFixture[str], no_exec: list[Any]
) -> None:
    """A safetensors index that points at a pickle: the file is parsed as a
    safetensors header (and refused), never handed to an unpickler."""
    shard = tiny.shards("bf16")[0]
    shard.write_bytes(pickle.dumps({"model.embed_tokens.weight": [0.0] * 64}))
    err = plan_fails(capsys, tiny.recipe_path)
    assert str(shard) in err and "the file is damaged or not safetensors" in err
    assert no_exec == []


# --- the package never runs code from data (static) ---------------------------------

# fully-qualified callables that must never appear in vllm_mixed
FORBIDDEN_CALLS = {
    "eval", "exec", "compile", "__import__", "breakpoint",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads",
    "torch.load", "torch.serialization.load", "numpy.load", "shelve.open", "dill.load", "dill.loads",
    "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
    "os.system", "os.popen", "os.execv", "os.execvp", "os.execl", "os.spawnv", "os.path.expanduser",
    "os.path.expandvars", "runpy.run_path", "runpy.run_module", "importlib.util.spec_from_file_location",
}  # fmt: skip
FORBIDDEN_MODULES = {"pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib", "runpy"}


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    """Calls in ``source`` that could run code from data."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name in FORBIDDEN_CALLS:
            found.append(f"{filename}:{node.lineno}: {name}(...)")
        elif name == "importlib.import_module" and not (node.args and isinstance(node.args[0], ast.Constant)):
            found.append(f"{filename}:{node.lineno}: importlib.import_module with a computed name")
        elif name == "getattr" and len(node.args) >= 2 and _is_module_like(node.args[0], aliases):
            # a literal, or a field of a fixed table row (``row.cpu_moe`` in config.py); never an item of data
            if not isinstance(node.args[1], ast.Constant | ast.Attribute):
                found.append(f"{filename}:{node.lineno}: getattr on a module with a computed name")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{filename}:{node.lineno}: {name}(..., shell=...)")
    return found


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _is_module_like(node: ast.AST, aliases: dict[str, str]) -> bool:
    """``getattr(some_module, name)``: a name bound by an import statement."""
    return isinstance(node, ast.Name) and node.id in aliases


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.loads(data)",
        "from torch import load as tl\ntl(path)",
        "import torch\ntorch.load(path, weights_only=True)",
        "eval(text)",
        "exec(code)",
        "__import__(name)",
        "import importlib\nimportlib.import_module(cfg['module'])",
        "from importlib import import_module\nimport_module(name)",
        "import subprocess\nsubprocess.run(cmd, shell=True)",
        "import yaml\nyaml.load(f, Loader=yaml.Loader)",
        "import os\nos.system(cmd)",
        "import os.path\nos.path.expandvars(p)",
        "from vllm_mixed import methods\ngetattr(methods, cfg['class'])",
    ],
)
def test_the_static_check_catches(snippet: str) -> None:
    assert violations(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import importlib\nimportlib.import_module('vllm_mixed.formats')",
        "import yaml\nyaml.safe_load(f)",
        "import subprocess\nsubprocess.Popen([sys.executable, '-m', 'x'], shell=False)",
        "from vllm_mixed.methods import cpu_dequant\ngetattr(cpu_dequant, 'CpuDequantFp8LinearMethod')",
        "getattr(layer, name, None)",
        "json.loads(text)",
    ],
)
def test_the_static_check_allows(snippet: str) -> None:
    assert violations(snippet) == []


def test_package_never_runs_code_from_data() -> None:
    """No eval/exec, no unpickling (pickle, torch.load, numpy.load), no
    unsafe YAML, no shell, no ``~``/``$VAR`` expansion, no import or module
    attribute chosen by data, anywhere in vllm_mixed."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 15
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert found == []
