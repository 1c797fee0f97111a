"""Fixtures for end-to-end runs of vLLM's CPU build on the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

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


def run_vllm(model: Path, load_format: str, request: dict, workdir: Path, env: dict | None = None) -> dict:
    """Run vllm_runner.py in a fresh process (``env``: extra variables); fail
    with its log on error."""
    workdir.mkdir(parents=True, exist_ok=True)
    req, out, log_path = workdir / "request.json", workdir / "result.json", workdir / "vllm.log"
    req.write_text(json.dumps(request))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
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


def routed_line(plan, short: str) -> str:
    """The load-log line for the first planned layer named ``short`` (its
    last name part), with the method ``plan`` predicts for it on this CPU:
    vLLM's own where this CPU has its kernel (AMX: int4 and FP8 experts),
    the dequantizing fallback elsewhere."""
    from vllm_mixed.cpu_kernels import cpu_method_name

    p = next(p for p in plan.layers if p.layer.name.rsplit(".", 1)[-1] == short)
    method = cpu_method_name(p.format, p.layer.kind, plan.sources[p.source].quant_config)
    return f"{short} <- source '{p.source}' ({p.format}) via {method}"


def max_gap(a: dict, b: dict) -> tuple[float, bool]:
    """Two runs' teacher-forced logprobs: the largest |logprob difference|
    over the tokens both returned, and whether every position's top-1 agrees."""
    gap, same_top1 = 0.0, True
    for seq_a, seq_b in zip(a["teacher"], b["teacher"], strict=True):
        for pa, pb in zip(seq_a, seq_b, strict=True):
            gap = max([gap, *(abs(pa[t][0] - pb[t][0]) for t in set(pa) & set(pb))])
            same_top1 &= min(pa, key=lambda t: pa[t][1]) == min(pb, key=lambda t: pb[t][1])
    return gap, same_top1


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


SERVED = re.compile(r"^vllm-mixed serve: (wrote|reused) the composed directory (\S+)", re.M)


def start_serve(recipe: Path, cache: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``vllm-mixed serve RECIPE`` (the installed command) with the fixture's
    vLLM flags on a free loopback port, ``VLLM_MIXED_CACHE=cache``, output to
    ``log_path``; returns (the process, its base URL) once /health answers."""
    script = Path(sys.executable).with_name("vllm-mixed")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "vllm_mixed.cli"]
    port = _free_port()
    # PYTHONFAULTHANDLER: a worker killed by a signal leaves its Python stack in the log
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONFAULTHANDLER": "1", "VLLM_MIXED_CACHE": str(cache)}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                *command, "serve", str(recipe), "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
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
    except BaseException:
        stop_serve(proc)
        raise
    return proc, base


def _children(pid: int) -> list[int]:
    """Direct children of a process (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stop_serve(proc: subprocess.Popen[bytes], timeout: float = 60) -> int | None:
    """SIGTERM ``vllm-mixed serve`` (it forwards the signal to the server)
    and return its exit status; if it has not exited within ``timeout``, kill
    it and the server's process group (the server runs in its own session)."""
    if proc.poll() is not None:
        return proc.returncode
    servers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *servers]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        proc.wait()
        return None


@pytest.fixture(scope="session")
def server(tiny_dirs: Path, tmp_path_factory: pytest.TempPathFactory):
    """``vllm-mixed serve`` of the tiny mix recipe (composed into a fresh
    cache, then vLLM's OpenAI server on the CPU build) on loopback, started
    once for the tests that use it (they run last, see above)."""
    root = tmp_path_factory.mktemp("server")
    log_path = root / "server.log"
    proc, base = start_serve(write_recipe(tiny_dirs, "mix", root), root / "cache", log_path)
    try:
        served = SERVED.search(log_path.read_text(errors="replace"))
        assert served and served.group(1) == "wrote", server_log_tail(log_path)
        yield Server(base, served.group(2), log_path)
    finally:
        stop_serve(proc)
