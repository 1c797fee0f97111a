"""``vllm-mixed serve`` on vLLM's CPU build. The session's ``server``
(conftest) is the first start: it composes the tiny mix into a fresh cache and
serves it (test_openai_server.py and test_concurrency.py talk to it). Here a
second start of the same recipe reuses that directory untouched and answers
as the first does, and SIGTERM ends it with the server's own exit status: one
extra engine start. A composed directory served without ``--load-format
mixed`` fails at once with the plugin's message (no engine starts)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import SERVED, Server, server_log_tail, start_serve, stop_serve, write_recipe
from vllm_mixed.compose import compose
from vllm_mixed.plan import build_plan
from vllm_mixed.processes import run_isolated
from vllm_mixed.recipe import load_recipe

PROMPT = "Hello, world! The capital of France is"
FAIL_FAST_S = 120  # importing vLLM and building its config takes ~10 s on two cores
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception)\b.*$", re.M)


def complete(base: str, model: str) -> list[int]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=60, max_retries=0)
    reply = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
    )
    assert reply.choices[0].text and reply.usage.completion_tokens == 8
    return list(reply.choices[0].token_ids)


def test_second_start_reuses_the_cache_and_sigterm_passes_through(
    server: Server, tiny_dirs: Path, tmp_path: Path
) -> None:
    base, model, _ = server
    config = Path(model) / "config.json"
    mtime = config.stat().st_mtime_ns
    first = complete(base, model)

    log = tmp_path / "serve.log"
    # the same recipe, written to another file: the key is its content and the shards', not its path
    proc, second_base = start_serve(write_recipe(tiny_dirs, "mix", tmp_path), Path(model).parents[1], log)
    try:
        line = SERVED.search(log.read_text(errors="replace"))
        assert line and line.groups() == ("reused", model), server_log_tail(log)
        assert config.stat().st_mtime_ns == mtime
        assert complete(second_base, model) == first  # the same composed model, the same greedy tokens
        (api_server,) = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid]
    finally:
        status = stop_serve(proc)
    text = log.read_text(errors="replace")
    # vLLM's server got the forwarded SIGTERM, shut down cleanly, and its status (0) is serve's
    assert "API server: shutdown triggered" in text, server_log_tail(log)
    assert status == 0, server_log_tail(log)
    assert not Path(f"/proc/{api_server}").exists() or _state(api_server) == "Z"


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _state(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[0] if fields else None


@pytest.fixture(scope="module")
def composed(tiny_dirs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("no-load-format")
    return compose(build_plan(load_recipe(write_recipe(tiny_dirs, "mix", root))), root / "mix")


@pytest.mark.parametrize("how", ["LLM", "api_server"])
def test_without_load_format_mixed_fails_with_the_plugins_message(how: str, composed: Path, tmp_path: Path) -> None:
    if how == "LLM":
        code = (
            "from vllm import LLM\n"
            f"LLM(model={str(composed)!r}, quantization='mixed', max_model_len=512, enforce_eager=True, "
            "gpu_memory_utilization=0.3)\n"
        )
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(composed),
               "--host", "127.0.0.1", "--port", "0", "--max-model-len", "512"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / "out.log"
    start = time.monotonic()
    rc = run_isolated(cmd, log, FAIL_FAST_S, env)  # its own process group, killed afterwards
    elapsed = time.monotonic() - start
    out = log.read_text(errors="replace")
    assert rc is not None, f"still running after {FAIL_FAST_S} s:\n{out[-3000:]}"
    assert rc != 0, out[-3000:]
    assert "Loading weights" not in out and "Cannot find any model weights" not in out
    print(f"{how}: exit status {rc} after {elapsed:.1f} s")
    # the last exception raised (pydantic wraps it: its message follows on the next lines)
    last = EXCEPTION_LINE.findall(out)[-1]
    after = out[out.rindex(last) :].splitlines()[:3]
    message = "\n".join(after)
    assert "add --load-format mixed" in message, out[-3000:]
    assert "--load-format auto: quantization 'mixed' reads its weights from the recipe's sources" in message
