#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU and its driver:
#   1. builds speechcache with `--features cuda` (system toolkit if nvcc is found, else CUDA 13.0
#      from PyPI via .ci/cuda-toolkit.sh), or takes the binaries of a --pack;
#   2. runs the device-path tests on the GPU (tests/device_paths.rs with
#      SPEECHCACHE_TEST_DEVICE): encoder parity with transformers (f32 <= 1e-4; f16 <= 5e-3 and
#      bf16 <= 4e-2 of each layer's largest value), finetune on candle autograd vs the CPU
#      engine, Adam, dropout, CTC through host copies, and extract's stores vs the CPU's;
#   3. measures extract x-real-time (`speechcache bench extract`, all hidden states copied to the
#      host in f16) for wav2vec2-base and -large at f32/f16/bf16 and batches 1-16, with peak GPU
#      memory, and transformers on the same GPU in the same go when torch sees it;
#   4. measures finetune train frames/s on the SSL-base config (benches/conf/ssl_vs_peer.toml) on
#      a feature store of a random wav2vec2-base over synthetic audio;
#   then prints one markdown table per measurement (also in OUT/gpu_check.md).
#
# usage: benches/gpu_check.sh [--device cuda:0] [--out DIR] [--quick] [--python PY]
#                             [--prebuilt DIR] [--skip-tests | --tests-only]
#        benches/gpu_check.sh --pack DIR     (on a build machine, no GPU needed: builds the CUDA
#                             binaries and a wheel cache so a GPU machine without network or
#                             toolkit runs `benches/gpu_check.sh --prebuilt DIR`)
# --quick: batches 1,4,16 and shorter runs. --python: a Python with torch (default: python3).
# Budget: under 8 minutes on an H100-class GPU once built (the build is not counted).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
device=cuda:0; out=bench-out/gpu; quick=0; py=python3; prebuilt=""; pack=""; skip_tests=0; tests_only=0
while (($#)); do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --python) py=$2; shift 2 ;;
    --prebuilt) prebuilt=$2; shift 2 ;;
    --pack) pack=$2; shift 2 ;;
    --skip-tests) skip_tests=1; shift ;;
    --tests-only) tests_only=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
started=$(date +%s)
say() { echo "gpu_check [$(($(date +%s) - started)) s]: $*" >&2; }

# ---------------------------------------------------------------- build (or take a pack)

# Sets CUDA_HOME/PATH for nvcc: a system toolkit when there is one, else the PyPI one. The
# driver stub is never put on LD_LIBRARY_PATH here: it would hide the real driver.
use_toolkit() {
  if command -v nvcc >/dev/null 2>&1; then
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
  elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    export PATH=$CUDA_HOME/bin:$PATH
  else
    bash .ci/cuda-toolkit.sh
    local keep=${LD_LIBRARY_PATH:-}
    # shellcheck source=/dev/null
    source "${SPEECHCACHE_CUDA_PREFIX:-/opt/cuda13}/env.sh"
    export LD_LIBRARY_PATH=$CUDA_HOME/lib${keep:+:$keep}
  fi
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)}
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
}

# Builds the binary and the device-path test binary; prints the test binary's path.
build_cuda() {
  cargo build --release --features cuda --target-dir target/cuda >&2
  cargo test --release --features cuda --target-dir target/cuda --test device_paths --no-run \
      --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*device_paths[^"]*\)".*/\1/p' | tail -1
}

if [ -n "$pack" ]; then
  use_toolkit
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  tests_bin=$(build_cuda)
  mkdir -p "$pack/wheels"
  # xz: the two binaries are ~120 MB, ~16 MB compressed (a lent machine takes 64 MiB).
  xz -T0 -6 -c target/cuda/release/speechcache > "$pack/speechcache.xz"
  xz -T0 -6 -c "$tests_bin" > "$pack/device_paths.xz"
  echo "$root" > "$pack/built_in"
  # transformers 4.46.3 for the peer and the random checkpoint, without what a torch venv has
  # (torch, numpy, filelock, fsspec, typing-extensions); torch comes from the GPU machine.
  for v in 3.10 3.11 3.12; do
    "$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
        --python-version "$v" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$pack/wheels" transformers==4.46.3 tokenizers==0.20.3 safetensors==0.8.0 \
        huggingface-hub==0.36.2 hf-xet==1.8.0 regex pyyaml tqdm requests charset-normalizer idna \
        urllib3 certifi packaging filelock fsspec typing-extensions >&2
  done
  du -sh "$pack" >&2
  echo "pack ready: $pack (run: benches/gpu_check.sh --prebuilt $pack)"
  exit 0
fi

if [ -n "$prebuilt" ]; then
  prebuilt=$(cd "$prebuilt" && pwd)
  built_in=$(cat "$prebuilt/built_in")
  # The test binary reads its fixtures and the speechcache binary from where it was built.
  if [ "$built_in" != "$root" ]; then
    [ -e "$built_in" ] || { mkdir -p "$(dirname "$built_in")"; ln -sfn "$root" "$built_in"; }
  fi
  mkdir -p target/cuda/release "$out"
  xz -dc "$prebuilt/speechcache.xz" > target/cuda/release/speechcache
  xz -dc "$prebuilt/device_paths.xz" > "$out/device_paths"
  chmod +x target/cuda/release/speechcache "$out/device_paths"
  tests_bin=$out/device_paths
  # No toolkit here: what the loader cannot find (ldd) is taken from the CUDA 13 runtime
  # libraries of the machine's torch venv (nvidia-* wheels).
  missing() { ldd target/cuda/release/speechcache | sed -n 's/^[[:space:]]*\([^ ]*\) => not found.*/\1/p'; }
  need=$(missing)
  if [ -n "$need" ]; then
    dirs=$("$py" -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null || true)
    for lib in $need; do
      # shellcheck disable=SC2086
      d=$( [ -n "$dirs" ] && find $dirs -name "$lib" 2>/dev/null | head -1 | xargs -r dirname)
      [ -z "$d" ] || export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    done
    need=$(missing)
    [ -z "$need" ] || { echo "gpu_check.sh: not found on this machine (driver, or in $py's nvidia wheels):" $need >&2; exit 1; }
  fi
else
  use_toolkit
  say "building with CUDA (CUDA_HOME=$CUDA_HOME, compute cap $CUDA_COMPUTE_CAP)"
  tests_bin=$(build_cuda)
fi
bin=$root/target/cuda/release/speechcache
mkdir -p "$out"; out=$(cd "$out" && pwd)
report=$out/gpu_check.md
: > "$report"
emit() { echo "$*" | tee -a "$report"; }
gpu_name=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "${device#cuda:}" 2>/dev/null || echo "$device")
emit "## GPU check: $gpu_name, $(date -u '+%Y-%m-%d %H:%M UTC')"
emit ""

# ---------------------------------------------------------------- device-path tests on the GPU

if [ "$skip_tests" = 0 ]; then
  say "device-path tests on $device"
  SPEECHCACHE_TEST_DEVICE=$device "$tests_bin" --test-threads 1 --nocapture > "$out/tests.log" 2>&1 || {
    tail -40 "$out/tests.log" >&2; echo "gpu_check.sh: device-path tests failed on $device" >&2; exit 1; }
  emit "### parity on $device (tests/device_paths.rs, all passed)"
  emit ""
  emit '```'
  grep -E 'tensor ops: vs|relative error|worst gradient|extract .* on ' "$out/tests.log" | tee -a "$report" || true
  emit '```'
  emit ""
fi

[ "$tests_only" = 0 ] || { say "done (tests only) in $(($(date +%s) - started)) s"; exit 0; }

# ---------------------------------------------------------------- extract x-real-time

if [ "$quick" = 1 ]; then batches="1 4 16"; min_batches=2; else batches="1 2 4 8 16"; min_batches=4; fi
# Peak GPU memory of a command: nvidia-smi sampled every 50 ms, minus the memory used before.
peak_mem_mb() {
  local log=$1; shift
  local idx=${device#cuda:} base
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$idx" 2>/dev/null || echo 0)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$idx" -lms 50 > "$log.mem" 2>/dev/null &
  local smi=$!
  "$@" > "$log" 2>&1 || { kill "$smi" 2>/dev/null; cat "$log" >&2; return 1; }
  kill "$smi" 2>/dev/null || true
  wait "$smi" 2>/dev/null || true
  sort -n "$log.mem" | tail -1 | awk -v b="$base" '{v = $1 - b; print (v > 0 ? v : "?")}'
}
peer_ok=0
if "$py" -c "import torch, transformers, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  peer_ok=1
fi
declare -A ours mem peer peer_mem
for size in base large; do
  for dtype in f32 f16 bf16; do
    for b in $batches; do
      n=$((b * min_batches)); [ "$n" -ge 32 ] || n=32
      say "extract $size $dtype batch $b ($((n * 10)) s of audio)"
      m=$(peak_mem_mb "$out/extract-$size-$dtype-$b.log" "$bin" bench extract --model "$size" \
          --device "$device" --dtype "$dtype" --batch "$b" --chunk 10 --seconds $((n * 10)))
      ours[$size.$dtype.$b]=$(sed -n 's/.*x_realtime=\([0-9.]*\).*/\1/p' "$out/extract-$size-$dtype-$b.log" | head -1)
      mem[$size.$dtype.$b]=$m
    done
  done
  if [ "$peer_ok" = 1 ]; then
    say "transformers $size on $device"
    "$py" benches/gpu_peer.py extract --device "$device" --size "$size" --batches "${batches// /,}" \
        --min-batches "$min_batches" > "$out/peer-$size.log" 2>&1 || tail "$out/peer-$size.log" >&2
    while read -r line; do
      key=$(echo "$line" | sed -n 's/.*size=\([a-z]*\) dtype=\([a-z0-9]*\) batch=\([0-9]*\).*/\1.\2.\3/p')
      peer[$key]=$(echo "$line" | sed -n 's/.*x_realtime=\([0-9.]*\).*/\1/p')
      peer_mem[$key]=$(echo "$line" | sed -n 's/.*peak_mb=\([0-9]*\).*/\1/p')
    done < <(grep '^peer ' "$out/peer-$size.log")
  fi
done
emit "### extract on $device: x-real-time, all hidden states to the host in f16 (10 s chunks)"
emit ""
emit "| model | compute | batch | speechcache x-RT | GPU memory (MB) | transformers x-RT | transformers peak alloc (MB) | ratio |"
emit "|---|---|---|---|---|---|---|---|"
for size in base large; do
  for dtype in f32 f16 bf16; do
    for b in $batches; do
      k=$size.$dtype.$b
      o=${ours[$k]:-?}; p=${peer[$k]:--}
      ratio=$(awk -v o="$o" -v p="$p" 'BEGIN{ if (p + 0 > 0 && o + 0 > 0) printf "%.2f", o / p; else print "-" }')
      emit "| wav2vec2-$size | $dtype | $b | $o | ${mem[$k]:-?} | $p | ${peer_mem[$k]:--} | $ratio |"
    done
  done
done
[ "$peer_ok" = 1 ] || emit "(transformers not measured: $py has no torch + transformers that sees a GPU)"
emit ""

# ---------------------------------------------------------------- finetune frames/s

minutes=1
utts=300; [ "$quick" = 1 ] && utts=120
fin=$out/finetune
mkdir -p "$fin"
if "$py" -c "import numpy, torch, transformers" 2>/dev/null; then
  say "finetune: corpus, random wav2vec2-base, feature store"
  [ -f "$fin/corpus/train.jsonl" ] || "$py" benches/gpu_peer.py noise-corpus "$fin/corpus" --utts "$utts"
  [ -f "$fin/w2v2-base/model.safetensors" ] || "$py" benches/gpu_peer.py random-model "$fin/w2v2-base"
  [ -f "$fin/audio/meta.json" ] || "$bin" prepare --quiet --input "$fin/corpus/train.jsonl" --out "$fin/audio"
  [ -f "$fin/feats/meta.json" ] || "$bin" extract --quiet --data "$fin/audio" --model "$fin/w2v2-base" \
      --out "$fin/feats" --device "$device" --batch-seconds 160
  say "finetune on $device for $minutes min"
  rm -rf "$fin/exp"
  fm=$(peak_mem_mb "$fin/finetune.log" "$bin" finetune --train "$fin/feats" --valid "$fin/feats" \
      --config benches/conf/ssl_vs_peer.toml --out "$fin/exp" --device "$device" --max-minutes "$minutes" --seed 1)
  fps=$(sed -n 's/.*: \([0-9]*\) train frames\/s$/\1/p' "$fin/finetune.log" | tail -1)
  engine=$(sed -n 's/.*steps in this run (\([^)]*\)).*/\1/p' "$fin/finetune.log" | tail -1)
  emit "### finetune on $device: SSL-base config (benches/conf/ssl_vs_peer.toml), $utts synthetic utterances, $minutes min"
  emit ""
  emit "| train frames/s | GPU memory (MB) | trainer |"
  emit "|---|---|---|"
  emit "| ${fps:-?} | $fm | ${engine:-?} |"
else
  emit "(finetune not measured: $py lacks numpy/torch/transformers for the synthetic store)"
fi
emit ""
say "done in $(($(date +%s) - started)) s; table in $report"

