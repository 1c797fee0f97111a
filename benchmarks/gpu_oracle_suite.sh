#!/usr/bin/env bash
# The tiny-model oracles of the new sources and architectures, on the lent GPU, in one call:
#   . benchmarks/device_setup.sh && bash benchmarks/gpu_oracle_suite.sh [JOB ...]
# JOB (default: all): variants ct int8 ct-rest qwen2 mixtral qwen2-moe llama qwen3, or ARCH=RECIPES
# (e.g. llama=all-fp8,mix: only those recipes and their stock rows); an ARCH or ct job ending in @repeat also
# runs each stock row twice (the kernels' run-to-run gap), @invariant the same with VLLM_BATCH_INVARIANT=1
# (no split-K / stream-K atomics in vLLM's and Humming's kernels; vLLM refuses Humming then), @marlin the
# same with every row, stock and plugin, on --moe-backend marlin, @a8 the same with every row under
# VLLM_HUMMING_INPUT_QUANT_CONFIG (Humming's FP8 activations, W4A8, on both sides' Humming experts). int8: the 8-bit GPTQ pair and the
# variants mix; ct-rest: the CT W4A16 pairs, the FP8 block pair and the CT mix (the rows the first H200
# run did not finish). ORACLE_PARALLEL jobs run at once (default 3; each row is one process, the engine
# inside it at TP 1). Every job ends by SUITE_S seconds after the start (default 540), so the archive is
# written inside one device call; a job that is not started by then is listed as skipped. Each job's rows
# (teacher logprobs included) and logs go into ONE archive, $OUT/oracles.tgz (the device returns only a
# handful of files), and its table is printed. variants, int8, ct and ct-rest take :ARCH (e.g. ct:mixtral): the
# same checks on that make-tiny architecture (default Qwen3-MoE); variants, int8 and ct also take =LIST, the
# recipes (variants, int8) or checkpoints (ct) to run, e.g. variants:llama=all-int4-actorder,all-int8 or
# ct:qwen3=ct-fp8-tensor-static,ct-fp8-block (a pure recipe brings its stock row).
set -u
jobs=("$@"); [ ${#jobs[@]} -eq 0 ] && jobs=(variants ct qwen2 mixtral qwen2-moe llama qwen3)
parallel=${ORACLE_PARALLEL:-3}
deadline=$((SECONDS + ${SUITE_S:-540}))
root=/tmp/oracle-suite
A8='{"input_dtype": "float8e4m3"}'  # gpu_throughput.py's @a8 rows: Humming quantizes the experts' inputs to FP8
run_job() {
  local j=$1 left=$2 a d e=()
  case $j in
    *@repeat) e=(ORACLE_EXTRA=--repeat-stock); j=${j%@repeat} ;;
    *@invariant) e=(ORACLE_EXTRA=--repeat-stock VLLM_BATCH_INVARIANT=1); j=${j%@invariant} ;;
    *@marlin) e=("ORACLE_EXTRA=--repeat-stock --moe-backend marlin"); j=${j%@marlin} ;;
    *@a8) e=(ORACLE_EXTRA=--repeat-stock "VLLM_HUMMING_INPUT_QUANT_CONFIG=$A8"); j=${j%@a8} ;;
  esac
  local arch=() pick=()
  case $j in variants*=*|int8*=*) pick=(--variant-recipes "${j#*=}"); j=${j%%=*} ;;
             ct*=*) pick=(--checkpoints "${j#*=}"); j=${j%%=*} ;; esac
  case $j in *:*) arch=(--arch "${j#*:}"); j=${j%%:*} ;; esac
  case $j in
    variants) a=(benchmarks/gpu_oracle.py --variants "${arch[@]}") ;;
    int8) a=(benchmarks/gpu_oracle.py --variants --variant-recipes all-int8,mix-variants "${arch[@]}") ;;
    ct) a=(benchmarks/gpu_oracle_ct.py "${arch[@]}") ;;
    ct-rest) a=(benchmarks/gpu_oracle_ct.py --checkpoints ct-w4a16,ct-w4a16-asym-g64,ct-fp8-block,mix "${arch[@]}") ;;
    *=*) a=(benchmarks/gpu_oracle.py --arch "${j%%=*}" --recipes "${j#*=}") ;;
    *) a=(benchmarks/gpu_oracle.py --arch "$j" --recipes all-fp8,all-int4,mix) ;;  # bf16: compared on the CPU
  esac
  d="$root/$(job_dir "$1")"
  mkdir -p "$d/out"
  env "${e[@]}" bash -c 'timeout "$0" python3 "$@" $ORACLE_EXTRA' "$left" "${a[@]}" "${pick[@]}" --out "$d/out" --work "$d/work" \
    > "$d/stdout.txt" 2>&1
  echo "$1 rc=$? (limit ${left}s, ended at ${SECONDS}s)" >> "$root/done.txt"
}
job_dir() {
  local j=${1%%=*}; j=${j/:/-}
  case $1 in *@repeat) j+=-repeat ;; *@invariant) j+=-invariant ;; *@marlin) j+=-marlin ;; *@a8) j+=-a8 ;; esac
  echo "$j"
}
mkdir -p "$root"
: > "$root/done.txt"
for j in "${jobs[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n; done
  left=$((deadline - SECONDS))
  if [ "$left" -lt 60 ]; then echo "$j skipped: ${left}s left" >> "$root/done.txt"; continue; fi
  run_job "$j" "$left" &
  sleep 5  # the first imports of each job do not all land at once
done
wait
bash benchmarks/device_cache.sh save
cd "$root" && tar czf "$OUT/oracles.tgz" done.txt */stdout.txt */out $(ls -d */work/*rows 2>/dev/null)
cat done.txt
for j in "${jobs[@]}"; do
  j=$(job_dir "$j")
  [ -f "$j/stdout.txt" ] || continue
  echo "== $j"
  grep -v '^INFO\|^WARNING\|^(EngineCore\|^(Worker\|^\[' "$j/stdout.txt" | grep -v '^\s*File\|^\s*\^' | tail -16 | cut -c1-240
done
