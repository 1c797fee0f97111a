#!/usr/bin/env bash
# The lent GPU's JIT caches from one device call to the next, across sessions: every machine is fresh, and
# the first row of each kernel family spent 65-100 s between "Model loading took" and the KV cache (2 s for
# the same kernels later on the same machine): most likely Triton, Humming or PTX-only kernels compiled on
# first use, which the same bundle on the same kind of card would compile identically again.
#   bash benchmarks/device_cache.sh save      # at the end of a call: $OUT/device-cache.tar, what fits
#   bash benchmarks/device_cache.sh restore   # device_setup.sh runs it: unpacks .device-cache/device-cache.tar
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
  save)  # each directory compressed once; the kept ones packed together uncompressed
    stage=$(mktemp -d); kept=(); dropped=(); total=0
    for d in "${dirs[@]}"; do
      [ -d "$d" ] || continue
      part="$stage/${#kept[@]}-${#dropped[@]}.tgz"
      tar czf "$part" -C "$HOME" "${d#"$HOME"/}"
      size=$(stat -c %s "$part")
      if [ $(( (total + size) / 1048576 )) -lt "$LIMIT_MIB" ]; then
        kept+=("${d#"$HOME"/}"); total=$((total + size))
      else
        dropped+=("${d#"$HOME"/}"); rm -f "$part"
      fi
    done
    [ ${#kept[@]} -gt 0 ] && tar cf "$OUT/device-cache.tar" -C "$stage" .
    rm -rf "$stage"
    echo "device cache: saved ${kept[*]:-nothing}${dropped[*]:+; left out (over ${LIMIT_MIB} MiB): ${dropped[*]}}" ;;
  restore)
    f=.device-cache/device-cache.tar
    [ -f "$f" ] || exit 0
    stage=$(mktemp -d); tar xf "$f" -C "$stage"
    parts=("$stage"/*.tgz)
    for part in "${parts[@]}"; do tar xzf "$part" -C "$HOME"; done
    echo "device cache: restored ${#parts[@]} cache directories"; rm -rf "$stage" ;;
  *) echo "usage: $0 save|restore" >&2; exit 2 ;;
esac
exit 0
