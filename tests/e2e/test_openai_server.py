"""The composed tiny mix served by vLLM's OpenAI server (CPU build) answers a
real ``openai`` client on loopback. The test starts and stops the server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.e2e.conftest import write_recipe
from vllm_mixed.compose import compose
from vllm_mixed.plan import build_plan
from vllm_mixed.recipe import load_recipe

START_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_dirs, tmp_path):
    composed = compose(build_plan(load_recipe(write_recipe(tiny_dirs, "mix", tmp_path))), tmp_path / "mix")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(composed),
            "--load-format", "mixed", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
            "--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-num-seqs", "8",
        ],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"server exited ({proc.returncode}):\n{(tmp_path / 'server.log').read_text()[-5000:]}"
                )
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server not ready in {START_TIMEOUT} s:\n{(tmp_path / 'server.log').read_text()[-5000:]}"
                )
            time.sleep(1)
        yield base, str(composed), tmp_path / "server.log"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def test_openai_client_completion(server):
    from openai import OpenAI

    base, model, log = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == [model]
    reply = client.completions.create(
        model=model, prompt="Hello, world! The capital of France is", max_tokens=8, temperature=0
    )
    again = client.completions.create(
        model=model, prompt="Hello, world! The capital of France is", max_tokens=8, temperature=0
    )
    assert reply.usage.completion_tokens == 8
    assert reply.choices[0].text, "empty completion"
    assert reply.choices[0].text == again.choices[0].text, "greedy completions must repeat"
    text = log.read_text()
    assert "vllm-mixed: loaded" in text and "CpuDequantGptqMoEMethod" in text
