#!/usr/bin/env bash
# Model forward and fbank throughput, speechcache vs the Python baselines (transformers on CPU,
# kaldi-native-fbank), on this machine in the same go, alternating runs.
# usage: benches/extract_vs_peer.sh [ROUNDS] [base|large]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
size=${2:-base}
py=$(bash ../shared/peers/setup.sh --torch | sed -n 's/^peers ready: //p')
cargo build --release -q
bin=${CARGO_TARGET_DIR:-target}/release/speechcache
threads=$(nproc)
for r in $(seq 1 "$rounds"); do
  echo "== round $r: wav2vec2-$size, 60 s of audio in 10 s chunks, batch 4, $threads threads, all hidden states"
  "$py" ../shared/peers/peer_extract.py --size "$size" --seconds 60 --chunk 10 --batch 4 --threads "$threads" | tail -1
  RAYON_NUM_THREADS=$threads "$bin" bench extract --model "$size" --seconds 60 --chunk 10 --batch 4
  echo "== round $r: fbank, 600 s of audio, one thread"
  "$py" ../shared/peers/peer_fbank.py --seconds 600 | tail -1
  RAYON_NUM_THREADS=1 "$bin" bench extract --model fbank --seconds 600
done
