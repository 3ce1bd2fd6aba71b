#!/usr/bin/env bash
# Long utterances (#22): `speechcache extract` on a store holding one utterance of each
# length, the whole process (launch to finished store, every hidden state at f16), against
# transformers' whole-utterance forward (../shared/peers/peer_extract.py --chunk L --batch 1,
# model time only) on the same machine, alternating rounds; wav2vec2-base geometry, random
# weights. Reports x-real-time, CPU use (of all cores) and peak RSS of both. Run it on an
# otherwise idle machine.
#
# usage: benches/long_utterances.sh [--lengths "60 300"] [--rounds R] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
lengths="60 300" rounds=1 out=bench-out/long
while [ $# -gt 0 ]; do
  case $1 in
    --lengths) lengths=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
py=$(bash ../shared/peers/setup.sh --torch | sed -n 's/^peers ready: //p')
cargo build --release -q
bin=${CARGO_TARGET_DIR:-target}/release/speechcache
threads=$(nproc)
mkdir -p "$out"
model=bench-out/extract/w2v2-base-random
[ -f "$model/model.safetensors" ] || "$py" - "$model" <<'PYEOF'
import sys, torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
torch.manual_seed(0)
Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(sys.argv[1])
Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(sys.argv[1])
PYEOF

# peak RSS (MB) and CPU % of a command, from GNU time
timed() { /usr/bin/time -f "%M %P" -o "$out/time.txt" "$@"; }
rss_mb() { awk '{printf "%.0f", $1 / 1024}' "$out/time.txt"; }
cpu_pct() { awk '{sub("%", "", $2); print $2}' "$out/time.txt"; }

for len in $lengths; do
  if [ ! -f "$out/audio-$len/meta.json" ]; then
    mkdir -p "$out/wav-$len"
    "$py" - "$out/wav-$len" "$len" <<'PYEOF'
import sys, numpy as np, soundfile as sf
rng = np.random.default_rng(0)
n = int(float(sys.argv[2]) * 16000)
sf.write(f"{sys.argv[1]}/long.wav", (rng.standard_normal(n) * 0.1).astype(np.float32), 16000, subtype="FLOAT")
PYEOF
    "$bin" prepare --quiet --input "$out/wav-$len" --out "$out/audio-$len"
  fi
  ours=() peer=()
  for r in $(seq 1 "$rounds"); do
    timed "$py" ../shared/peers/peer_extract.py --size base --seconds "$len" --chunk "$len" \
      --batch 1 --threads "$threads" > "$out/peer-$len-$r.log"
    p=$(tail -1 "$out/peer-$len-$r.log" | sed -n 's/.*x_realtime=\([0-9.]*\).*/\1/p')
    p_rss=$(rss_mb) p_cpu=$(cpu_pct)
    rm -rf "$out/features-$len"
    start=$(date +%s.%N)
    timed "$bin" extract --quiet --data "$out/audio-$len" --model "$model" \
      --out "$out/features-$len" --max-seconds-per-utterance "$len" > "$out/ours-$len-$r.log"
    wall=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{print e - s}')
    o=$(awk -v w="$wall" -v l="$len" 'BEGIN{printf "%.2f", l / w}')
    echo "round $r, ${len} s: transformers ${p}x (model only; process peak ${p_rss} MB, CPU ${p_cpu}%), speechcache extract ${o}x (whole process, ${wall} s; peak ${o_rss:=$(rss_mb)} MB, CPU $(cpu_pct)%)"
    unset o_rss
    peer+=("$p") ours+=("$o")
  done
  median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
  om=$(median "${ours[@]}") pm=$(median "${peer[@]}")
  echo "== one ${len} s utterance, wav2vec2-base, all hidden states f16, $threads threads: speechcache ${om}x vs transformers ${pm}x real time: $(awk -v a="$om" -v b="$pm" 'BEGIN{printf "%.2f", a / b}')x"
done
