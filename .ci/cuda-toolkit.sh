#!/usr/bin/env bash
# The CUDA 13.0 compiler, headers and runtime libraries from PyPI, for `--features cuda` builds on
# machines without a GPU or a system toolkit. Installs into a fixed prefix (default /opt/cuda13,
# override with SPEECHCACHE_CUDA_PREFIX) and does nothing when the pinned set is already there.
#
# Why these pins: only the CUDA 13 wheels ship nvcc; 13.0 writes PTX 9.0, which the lent GPU
# machines' driver (580, CUDA 13.0) loads, where newer nvcc writes PTX it refuses. nvcc's
# nvvm/crt dependencies are unpinned upstream (pip would take 13.5), so they are pinned here.
#
# Afterwards $PREFIX/env.sh sets CUDA_HOME, PATH, CUDA_COMPUTE_CAP and LD_LIBRARY_PATH (the
# runtime libraries and a libcuda stub, so a CUDA build starts without a driver).
set -euo pipefail
prefix="${SPEECHCACHE_CUDA_PREFIX:-/opt/cuda13}"
pins=(
  "cuda-toolkit[nvcc,cudart,cublas,curand,cccl,nvrtc]==13.0.2"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
)
here="$(cd "$(dirname "$0")" && pwd)"
stamp="$prefix/.installed"
want="$(printf '%s\n' "${pins[@]}"; sha256sum "$here/cuda-toolkit.sh" "$here/cuda_stub.py" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$prefix/py/nvidia/cu13/bin/nvcc" ]; then
  exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-pip >/dev/null
fi
rm -rf "$prefix"
mkdir -p "$prefix"
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
  --target "$prefix/py" "${pins[@]}"
cuda_home="$prefix/py/nvidia/cu13"
[ -x "$cuda_home/bin/nvcc" ] || { echo "cuda-toolkit.sh: no nvcc in $cuda_home/bin after pip install" >&2; exit 1; }

# The wheels ship only versioned sonames; the linker asks for the unversioned names.
for lib in cudart cublas cublasLt nvrtc curand; do
  versioned="$(find "$cuda_home/lib" -maxdepth 1 -name "lib$lib.so.*" | sort | head -n1)"
  [ -n "$versioned" ] || { echo "cuda-toolkit.sh: lib$lib.so.* missing in $cuda_home/lib" >&2; exit 1; }
  ln -sf "$(basename "$versioned")" "$cuda_home/lib/lib$lib.so"
done

# No driver here: a libcuda stub whose every cu* entry point returns CUDA_ERROR_STUB_LIBRARY (34).
mkdir -p "$prefix/stub"
python3 "$here/cuda_stub.py" "$cuda_home/include/cuda.h" >"$prefix/stub/cuda_stub.c"
cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$prefix/stub/libcuda.so.1" "$prefix/stub/cuda_stub.c"
ln -sf libcuda.so.1 "$prefix/stub/libcuda.so"

cat >"$prefix/env.sh" <<EOF
# Source this to build or run speechcache --features cuda with the toolkit from PyPI.
export CUDA_HOME="$cuda_home"
export CUDA_PATH="$cuda_home"
export PATH="$cuda_home/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="\${CUDAFORGE_THREADS:-\$(nproc)}"
export LIBRARY_PATH="$cuda_home/lib:$prefix/stub\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cuda_home/lib:$prefix/stub\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
printf '%s\n' "$want" >"$stamp"
