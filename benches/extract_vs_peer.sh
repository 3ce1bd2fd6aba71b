#!/usr/bin/env bash
# `speechcache extract`, the whole process (launch to finished store: model load, weight hash,
# the model, f16 encoding, checksums, shard writes), against transformers' model-only forward
# (../shared/peers/peer_extract.py) on the same machine, alternating rounds; then fbank against
# kaldi-native-fbank. Run it on an otherwise idle machine: other jobs slow PyTorch's threads far
# more than ours and flatter the ratio.
#
# usage: benches/extract_vs_peer.sh [--family wav2vec2|wavlm|data2vec-audio] [--rounds R]
#                                   [--sizes "base large"] [--out DIR] [--no-fbank]
#
# Input: six 10 s files of noise at 0.1 rms (what the peer feeds its model), prepared once into
# an audio store; models: the family's base / large geometry with random weights (transformers,
# seed 0, save_pretrained), saved once as safetensors. Every hidden state is stored, f16, 2
# threads. wav2vec2 is compared with ../shared/peers/peer_extract.py, the other families with
# benches/peer_extract_family.py (the same protocol on the saved model, loaded by AutoModel).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 sizes="base large" out=bench-out/extract fbank=1 family=wav2vec2
while [ $# -gt 0 ]; do
  case $1 in
    --family) family=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-fbank) fbank=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case $family in
  wav2vec2) tag=w2v2 ;;
  wavlm) tag=wavlm ;;
  data2vec-audio) tag=d2v-audio ;;
  *) echo "unknown --family $family (wav2vec2, wavlm or data2vec-audio)" >&2; exit 2 ;;
esac
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
  model=$out/$tag-$size-random
  [ -f "$model/model.safetensors" ] || "$py" - "$model" "$size" "$family" <<'EOF'
import sys, torch
from transformers import (Data2VecAudioConfig, Data2VecAudioModel, Wav2Vec2Config,
                          Wav2Vec2FeatureExtractor, Wav2Vec2Model, WavLMConfig, WavLMModel)
large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
family, is_large = sys.argv[3], sys.argv[2] == "large"
cfg_cls, model_cls = {"wav2vec2": (Wav2Vec2Config, Wav2Vec2Model), "wavlm": (WavLMConfig, WavLMModel),
                      "data2vec-audio": (Data2VecAudioConfig, Data2VecAudioModel)}[family]
if family == "data2vec-audio":  # always LayerNorm convs and post-LN; no such options
    large = {k: v for k, v in large.items() if k not in ("feat_extract_norm", "do_stable_layer_norm")}
torch.manual_seed(0)
cfg = cfg_cls(**(large if is_large else {}))
model_cls(cfg).save_pretrained(sys.argv[1])
Wav2Vec2FeatureExtractor(do_normalize=is_large or family == "data2vec-audio").save_pretrained(sys.argv[1])
EOF
  ours=() peer=()
  for r in $(seq 1 "$rounds"); do
    if [ "$family" = wav2vec2 ]; then
      peer_cmd=(../shared/peers/peer_extract.py --size "$size")
    else
      peer_cmd=(benches/peer_extract_family.py --model "$model")
    fi
    p=$("$py" "${peer_cmd[@]}" --seconds 60 --chunk 10 --batch 4 \
        --threads "$threads" | tail -1 | sed -n 's/.*x_realtime=\([0-9.]*\).*/\1/p')
    rm -rf "$out/features-$tag-$size"
    start=$(date +%s.%N)
    "$bin" extract --quiet --data "$out/audio" --model "$model" --out "$out/features-$tag-$size" \
      > "$out/extract-$tag-$size-$r.log"
    wall=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{print e - s}')
    o=$(awk -v w="$wall" 'BEGIN{printf "%.2f", 60 / w}')
    echo "round $r, $size: transformers (model only) ${p}x, speechcache extract (whole process, ${wall} s) ${o}x"
    sed -n '2p' "$out/extract-$tag-$size-$r.log"
    peer+=("$p") ours+=("$o")
  done
  median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
  om=$(median "${ours[@]}") pm=$(median "${peer[@]}")
  echo "== $family-$size, 60 s (six 10 s files), all hidden states f16, $threads threads, $rounds rounds: \
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
