"""GPU oracle parity (marked ``gpu``; skipped without CUDA). On the device:
``. benchmarks/device_setup.sh && make test-gpu``.

Stock vLLM on each single checkpoint is the oracle: the plugin's pure recipes
must give exactly its greedy tokens; the mix must stay within the serve
issue's tolerance of the float32 reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and vLLM's CUDA build"),
]

ORACLE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_oracle.py"


# every architecture's tiny model; the ones beyond Qwen3-MoE run stock vLLM's CUDA int4/FP8 MoE kernels only here
@pytest.mark.parametrize("arch", ["qwen3-moe", "llama", "qwen2", "mixtral", "qwen2-moe"])
def test_recipes_match_stock_vllm(tmp_path, arch):
    proc = subprocess.run(
        [sys.executable, str(ORACLE), "--out", str(tmp_path), "--work", str(tmp_path / "work"), "--arch", arch],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {r["recipe"]: r for r in json.loads((tmp_path / "oracle.json").read_text())["rows"]}
    for name in ("all-bf16", "all-fp8", "all-int4"):
        assert rows[name]["ok"] and rows[name]["same_greedy_as_stock"], rows[name]
    assert rows["mix"]["top1_vs_fp32_ref"] >= 0.90 and rows["mix"]["worst_logprob_gap"] <= 0.15, rows["mix"]
