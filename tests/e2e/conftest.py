"""Fixtures for end-to-end runs of vLLM's CPU build on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_mixed.tiny import make_tiny

RUNNER = Path(__file__).with_name("vllm_runner.py")
RUN_TIMEOUT = 300

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
