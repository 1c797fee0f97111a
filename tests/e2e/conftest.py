"""Fixtures for end-to-end runs of vLLM's CPU build on the tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

from vllm_mixed.compose import compose
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe
from vllm_mixed.tiny import make_tiny

RUNNER = Path(__file__).with_name("vllm_runner.py")
RUN_TIMEOUT = 300
SERVER_START_TIMEOUT = 300
SERVER_MAX_NUM_SEQS = 8

# the four recipes of the serve issue, over the same three sources
RECIPES = {
    "all-bf16": {"default": "bf16", "rules": []},
    "all-fp8": {"default": "fp8", "rules": []},
    "all-int4": {"default": "int4", "rules": []},
    "mix": {"default": "bf16", "rules": [{"targets": ["model.layers.*.mlp.experts"], "source": "int4"}]},
}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
    # the tests on the one shared OpenAI server run last and back to back, so
    # the server (about 3 GB) stops right after them, at the session's end
    items.sort(key=lambda item: "server" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root)
    return root


def write_recipe(tiny_dirs: Path, name: str, directory: Path) -> Path:
    import yaml

    body = {
        "sources": {
            "bf16": str(tiny_dirs / "bf16"),
            "fp8": str(tiny_dirs / "fp8"),
            "int4": str(tiny_dirs / "gptq-int4"),
        },
        "base": "bf16",
        "dtype": "bfloat16",
        **RECIPES[name],
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run_vllm(model: Path, load_format: str, request: dict, workdir: Path) -> dict:
    """Run vllm_runner.py in a fresh process; fail with its log on error."""
    req, out, log_path = workdir / "request.json", workdir / "result.json", workdir / "vllm.log"
    req.write_text(json.dumps(request))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tp = request.get("tp", 1)
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        # vLLM's CPU build binds each TP rank to a NUMA node; on one node the ranks need explicit cores
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < tp:
            pytest.skip(
                f"tensor_parallel_size {tp} on the CPU build needs {tp} cores, this machine allows {len(cores)}"
            )
        per = len(cores) // tp
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(map(str, cores[i * per : (i + 1) * per])) for i in range(tp)
        )
    # output to a file, not a pipe: a lingering engine process must not hold the test up
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(RUNNER), str(model), load_format, str(req), str(out)],
            stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT, env=env, start_new_session=True,
        )  # fmt: skip
    text = log_path.read_text()
    if not out.exists() or "RUNNER_OK" not in text:
        raise AssertionError(f"vLLM run failed ({proc.returncode}):\n{text[-6000:]}")
    result = json.loads(out.read_text())
    result["log"] = text
    return result


class Server(NamedTuple):
    base: str  # http://127.0.0.1:PORT
    model: str  # the served model id: the composed directory
    log: Path  # the server's stdout and stderr


def server_log_tail(log: Path, chars: int = 5000) -> str:
    """The end of the server log, after the stack of a process killed by a
    signal (faulthandler's report) if there is one: that is the root cause."""
    text = log.read_text(errors="replace")
    fatal = text.find("Fatal Python error")
    return (text[fatal : fatal + 4000] + "\n[...]\n" if fatal >= 0 else "") + text[-chars:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tiny_dirs: Path, tmp_path_factory: pytest.TempPathFactory):
    """vLLM's OpenAI server (CPU build) on the composed tiny mix on loopback,
    started once for the tests that use it (they run last, see above)."""
    root = tmp_path_factory.mktemp("server")
    composed = compose(build_plan(load_recipe(write_recipe(tiny_dirs, "mix", root))), root / "mix")
    port, log_path = _free_port(), root / "server.log"
    # PYTHONFAULTHANDLER: a worker killed by a signal leaves its Python stack in the log
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONFAULTHANDLER": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(composed),
                "--load-format", "mixed", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
                "--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-num-seqs", str(SERVER_MAX_NUM_SEQS),
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n{server_log_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready in {SERVER_START_TIMEOUT} s:\n{server_log_tail(log_path)}")
            time.sleep(1)
        yield Server(base, str(composed), log_path)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
