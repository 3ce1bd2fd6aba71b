#!/usr/bin/env bash
# End-to-end prepare throughput, speechcache vs the Python baseline (soundfile + soxr HQ +
# multiprocessing), on the same files in the same go, alternating runs.
# usage: benches/prepare_vs_peer.sh [CORPUS_DIR] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:-/tmp/speechcache-bench-corpus}
rounds=${2:-2}
[ -d "$corpus" ] || bash benches/make_bench_corpus.sh "$corpus" 90
py=$(bash ../shared/peers/setup.sh | sed -n 's/^peers ready: //p')
cargo build --release -q
bin=${CARGO_TARGET_DIR:-target}/release/speechcache
jobs=$(nproc)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cat "$corpus"/* > /dev/null   # warm the page cache for both
for r in $(seq 1 "$rounds"); do
  rm -rf "$work"/*
  t0=$(date +%s.%N); "$py" ../shared/peers/peer_prepare.py "$corpus" "$work/peer" --jobs "$jobs" | tail -1; t1=$(date +%s.%N)
  "$bin" prepare --quiet --input "$corpus" --out "$work/ours" --jobs "$jobs" | tail -1; t2=$(date +%s.%N)
  echo "round $r: peer wall $(echo "$t1 - $t0" | bc) s, speechcache wall $(echo "$t2 - $t1" | bc) s, ratio (peer/ours) $(echo "scale=2; ($t1 - $t0) / ($t2 - $t1)" | bc)"
done
"$bin" bench prepare --input "$corpus" --jobs 1,$jobs
