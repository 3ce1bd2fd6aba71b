#!/usr/bin/env bash
# The CUDA build check (no GPU needed): installs the CUDA 13.0 toolkit from PyPI, builds
# `--features cuda` into target/cuda (the CPU build in target/ is left alone), and runs every
# test with that build against a libcuda stub: every CPU path must work and `--device cuda`
# must fail in one line. Also checks that the default build links no CUDA library.
# SPEECHCACHE_CUDA_CHECK=0 skips it (e.g. on a laptop without 1.2 GB to spare for the toolkit).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SPEECHCACHE_CUDA_CHECK:-1}" = 0 ]; then
  echo "cuda_build.sh: skipped (SPEECHCACHE_CUDA_CHECK=0)"
  exit 0
fi
started=$(date +%s)
bash .ci/cuda-toolkit.sh
# shellcheck source=/dev/null
source "${SPEECHCACHE_CUDA_PREFIX:-/opt/cuda13}/env.sh"

cpu_bin=${CARGO_TARGET_DIR:-target}/release/speechcache
if [ -x "$cpu_bin" ]; then
  if ldd "$cpu_bin" | grep -E 'lib(cuda|cudart|cublas|cublasLt|curand|nvrtc)\.so'; then
    echo "cuda_build.sh: the default build $cpu_bin links CUDA libraries" >&2
    exit 1
  fi
fi

cargo test --release --features cuda --target-dir target/cuda
cuda_bin=target/cuda/release/speechcache
# ldd's output is read whole first: `ldd | grep -q` under pipefail fails at random when grep
# stops at the first match and ldd gets SIGPIPE.
linked=$(ldd "$cuda_bin")
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcurand.so.10; do
  grep -q "$lib => /" <<< "$linked" || { echo "cuda_build.sh: $cuda_bin does not link $lib" >&2; exit 1; }
done
echo "cuda_build.sh: CUDA build and its tests passed in $(($(date +%s) - started)) s"
