#!/usr/bin/env bash
# The lent GPU's JIT caches from one device call to the next, across sessions: every machine is fresh, and
# the first row of each kernel family spent 65-100 s between "Model loading took" and the KV cache (2 s for
# the same kernels later on the same machine): most likely Triton, Humming or PTX-only kernels compiled on
# first use, which the same bundle on the same kind of card would compile identically again.
#   bash benchmarks/device_cache.sh save      # at the end of a call: $OUT/device-cache.tgz, if it fits
#   bash benchmarks/device_cache.sh restore   # device_setup.sh runs it: unpacks .device-cache/device-cache.tgz
# Between sessions, copy the returned file to .device-cache/ (ignored by git) and carry
# [".vllm-bundle", ".device-cache"]; the bundle is 48.6 MiB of the 64 MiB a call may carry, so the archive
# must stay under LIMIT_MIB. A stale or foreign cache only costs the compile it failed to save.
set -u
LIMIT_MIB=${DEVICE_CACHE_MIB:-13}
# in order of worth: each is kept only if the archive still fits with it
# (.nv/ComputeCache: the CUDA driver's JIT of PTX-only kernels, compiled again on every fresh machine)
dirs=("$HOME/.triton/cache" "$HOME/.nv/ComputeCache" "$HOME/.cache/vllm/modelinfos" "$HOME/.cache/humming" "$HOME/.cache/tvm-ffi"
      "$HOME/.cache/vllm/torch_compile_cache")
case ${1:-} in
  save)
    kept=(); dropped=()
    for d in "${dirs[@]}"; do
      [ -d "$d" ] || continue
      tar czf "$OUT/device-cache.tgz.new" -C "$HOME" "${kept[@]}" "${d#"$HOME"/}"
      if [ $(( $(stat -c %s "$OUT/device-cache.tgz.new") / 1048576 )) -lt "$LIMIT_MIB" ]; then
        kept+=("${d#"$HOME"/}"); mv "$OUT/device-cache.tgz.new" "$OUT/device-cache.tgz"
      else
        dropped+=("${d#"$HOME"/}"); rm -f "$OUT/device-cache.tgz.new"
      fi
    done
    echo "device cache: saved ${kept[*]:-nothing}${dropped[*]:+; left out (over ${LIMIT_MIB} MiB): ${dropped[*]}}" ;;
  restore)
    f=.device-cache/device-cache.tgz
    [ -f "$f" ] && tar xzf "$f" -C "$HOME" && echo "device cache: restored $(tar tzf "$f" | wc -l) entries" ;;
  *) echo "usage: $0 save|restore" >&2; exit 2 ;;
esac
exit 0
