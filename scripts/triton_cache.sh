#!/usr/bin/env bash
# Carry Triton's compile cache between device sessions (every lent machine starts cold; vLLM's TurboQuant was
# slow on its first use in session 6, presumably compiling: first load > 150 s, first 4k generation 112 s). Same kit + same GPU type -> the cache keys match.
#   source scripts/triton_cache.sh restore   # before a job: .gpudata/triton_cache.tar.xz -> $TRITON_CACHE_DIR
#   source scripts/triton_cache.sh save      # after it: $TRITON_CACHE_DIR -> $OUT/triton_cache.tar.xz (if <= 4 MB)
# Copy a saved archive to .gpudata/ on the CPU for the next session (git-ignored; it counts against the 64 MiB
# a call may carry: .gpukit/b is ~58 MB).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
case ${1:-} in
  restore)
    if [ -f .gpudata/triton_cache.tar.xz ]; then
      tar xJf .gpudata/triton_cache.tar.xz -C "$TRITON_CACHE_DIR" && \
        echo "triton cache: restored $(ls "$TRITON_CACHE_DIR" | wc -l) entries"
    fi ;;
  save)
    if [ -n "${OUT:-}" ] && [ -d "$TRITON_CACHE_DIR" ]; then
      tar cJf "$OUT/triton_cache.tar.xz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
      size=$(stat -c %s "$OUT/triton_cache.tar.xz" 2>/dev/null || echo 0)
      if [ "$size" -gt 4194304 ]; then
        rm -f "$OUT/triton_cache.tar.xz"; echo "triton cache: $size B compressed, too big to carry; not saved"
      else
        echo "triton cache: saved $size B to \$OUT/triton_cache.tar.xz"
      fi
    fi ;;
  *) echo "usage: source scripts/triton_cache.sh restore|save" ;;
esac
