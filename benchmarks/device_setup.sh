#!/usr/bin/env bash
# On the lent GPU, from the repo root: unpack vLLM 0.26 from the bundle (see
# ../shared/device/README.md) and make this checkout a vLLM plugin there
# without pip or network: a dist-info with the entry point next to the bundle,
# and the repo on PYTHONPATH. Source it: `. benchmarks/device_setup.sh`.
set -e
bash .vllm-bundle/setup.sh .vllm-bundle > "${OUT:-/tmp}/setup.log" 2>&1 || { tail -30 "${OUT:-/tmp}/setup.log"; return 1 2>/dev/null || exit 1; }
. /tmp/site/env.sh
info=/tmp/site/vllm_mixed-0.1.0.dist-info
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: vllm-mixed\nVersion: 0.1.0\n' > "$info/METADATA"
# the second entry is benchmark-only and inert unless its variables are set (benchmarks/bench_hooks.py)
printf '[vllm.general_plugins]\nmixed = vllm_mixed:register\nbench_hooks = benchmarks.bench_hooks:register\n' > "$info/entry_points.txt"
export PYTHONPATH="$PWD:$PYTHONPATH"
python3 -c "from importlib.metadata import entry_points as e; assert any(x.name == 'mixed' for x in e(group='vllm.general_plugins'))"
bash benchmarks/device_cache.sh restore  # JIT caches carried from an earlier call, if any
set +e
