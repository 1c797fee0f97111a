#!/usr/bin/env bash
# The tiny-model oracles of the new sources and architectures, on the lent GPU, in one call:
#   . benchmarks/device_setup.sh && bash benchmarks/gpu_oracle_suite.sh [JOBS ...]
# JOBS (default: all): variants ct qwen2 mixtral qwen2-moe llama qwen3 (about 43 engine starts: split
# them over two calls, e.g. `variants ct qwen2-moe` and `mixtral qwen2 llama qwen3`). Two run at a time: each
# engine's first start of a kernel compiles its Triton kernels (~90 s on a fresh machine), and six
# at once ran past 430 s. Each job's rows (teacher logprobs included) and logs go into ONE archive,
# $OUT/oracles.tgz (the device returns only a handful of files), and its table is printed.
set -u
jobs=("$@"); [ ${#jobs[@]} -eq 0 ] && jobs=(variants ct qwen2 mixtral qwen2-moe llama qwen3)
limit=${ORACLE_JOB_S:-420}
run_job() {
  local j=$1 a
  case $j in
    variants) a=(benchmarks/gpu_oracle.py --variants) ;;
    ct) a=(benchmarks/gpu_oracle_ct.py) ;;
    *) a=(benchmarks/gpu_oracle.py --arch "$j" --recipes all-fp8,all-int4,mix) ;;  # bf16: compared on the CPU
  esac
  mkdir -p "/tmp/oracle-suite/$j/out"
  timeout "$limit" python3 "${a[@]}" --out "/tmp/oracle-suite/$j/out" --work "/tmp/oracle-suite/$j/work" \
    > "/tmp/oracle-suite/$j/stdout.txt" 2>&1
  echo "$j rc=$?" >> /tmp/oracle-suite/done.txt
}
mkdir -p /tmp/oracle-suite
for ((i = 0; i < ${#jobs[@]}; i += 2)); do
  run_job "${jobs[i]}" &
  [ $((i + 1)) -lt ${#jobs[@]} ] && run_job "${jobs[i + 1]}" &
  wait
done
cd /tmp/oracle-suite && tar czf "$OUT/oracles.tgz" done.txt */stdout.txt */out $(ls -d */work/*rows 2>/dev/null)
cat done.txt
for j in "${jobs[@]}"; do
  echo "== $j"
  grep -v '^INFO\|^WARNING\|^(EngineCore\|^(Worker\|^\[' "$j/stdout.txt" | grep -v '^\s*File\|^\s*\^' | tail -16 | cut -c1-240
done
