#!/usr/bin/env bash
# `speechcache extract`, the whole process (launch to finished store: model load, weight hash,
# the model, f16 encoding, checksums, shard writes), against transformers' model-only forward
# (../shared/peers/peer_extract.py) on the same machine, alternating rounds; then fbank against
# kaldi-native-fbank. Run it on an otherwise idle machine: other jobs slow PyTorch's threads far
# more than ours and flatter the ratio.
#
# usage: benches/extract_vs_peer.sh [--rounds R] [--sizes "base large"] [--out DIR] [--no-fbank]
#
# Input: six 10 s files of noise at 0.1 rms (what the peer feeds its model), prepared once into
# an audio store; models: wav2vec2 base / large geometry with random weights (transformers,
# seed 0), saved once as safetensors. Every hidden state is stored, f16, 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 sizes="base large" out=bench-out/extract fbank=1
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-fbank) fbank=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
py=$(bash ../shared/peers/setup.sh --torch | sed -n 's/^peers ready: //p')
cargo build --release -q
bin=${CARGO_TARGET_DIR:-target}/release/speechcache
threads=$(nproc)
mkdir -p "$out"

# six 10 s files of noise, as the peer's torch.randn(...) * 0.1, written as float WAV
if [ ! -f "$out/audio/meta.json" ]; then
  mkdir -p "$out/wav"
  "$py" - "$out/wav" <<'EOF'
import sys, numpy as np, soundfile as sf
rng = np.random.default_rng(0)
for i in range(6):
    sf.write(f"{sys.argv[1]}/noise{i}.wav", (rng.standard_normal(160000) * 0.1).astype(np.float32), 16000, subtype="FLOAT")
EOF
  "$bin" prepare --quiet --input "$out/wav" --out "$out/audio"
fi

for size in $sizes; do
  model=$out/w2v2-$size-random
  [ -f "$model/model.safetensors" ] || "$py" - "$model" "$size" <<'EOF'
import sys, torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
torch.manual_seed(0)
cfg = Wav2Vec2Config(**(large if sys.argv[2] == "large" else {}))
Wav2Vec2Model(cfg).save_pretrained(sys.argv[1])
Wav2Vec2FeatureExtractor(do_normalize=sys.argv[2] == "large").save_pretrained(sys.argv[1])
EOF
  ours=() peer=()
  for r in $(seq 1 "$rounds"); do
    p=$("$py" ../shared/peers/peer_extract.py --size "$size" --seconds 60 --chunk 10 --batch 4 \
        --threads "$threads" | tail -1 | sed -n 's/.*x_realtime=\([0-9.]*\).*/\1/p')
    rm -rf "$out/features-$size"
    start=$(date +%s.%N)
    "$bin" extract --quiet --data "$out/audio" --model "$model" --out "$out/features-$size" \
      > "$out/extract-$size-$r.log"
    wall=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{print e - s}')
    o=$(awk -v w="$wall" 'BEGIN{printf "%.2f", 60 / w}')
    echo "round $r, $size: transformers (model only) ${p}x, speechcache extract (whole process, ${wall} s) ${o}x"
    sed -n '2p' "$out/extract-$size-$r.log"
    peer+=("$p") ours+=("$o")
  done
  median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
  om=$(median "${ours[@]}") pm=$(median "${peer[@]}")
  echo "== wav2vec2-$size, 60 s (six 10 s files), all hidden states f16, $threads threads, $rounds rounds: \
median speechcache ${om}x real time (whole process) vs transformers ${pm}x (model only): \
$(awk -v a="$om" -v b="$pm" 'BEGIN{printf "%.2f", a / b}')x"
done

if [ "$fbank" = 1 ]; then
  for r in $(seq 1 "$rounds"); do
    echo "== round $r: fbank, 600 s of audio, one thread"
    "$py" ../shared/peers/peer_fbank.py --seconds 600 | tail -1
    RAYON_NUM_THREADS=1 "$bin" bench extract --model fbank --seconds 600
  done
fi
