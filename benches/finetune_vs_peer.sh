#!/usr/bin/env bash
# Finetuning throughput, speechcache vs PyTorch on the same corpus, the same minutes, the same
# 2 cores, alternating rounds. Run it on an otherwise idle machine.
#
#   fbank: the finetune issue's config (benches/conf/fbank_vs_peer.toml: 80-dim fbank,
#          Conformer 4 x 144, conv2d) against ../shared/peers/peer_finetune.py (torchaudio
#          Conformer on Kaldi data dirs). speechcache runs what a user runs: prepare -> extract
#          fbank (once) -> finetune --max-minutes M -> decode.
#   ssl:   manifests/conf/ssl_base_conformer.toml's shapes (benches/conf/ssl_vs_peer.toml: 13
#          layers x 768 of a random wav2vec2-base, weighted, utterance MVN, preencoder 80,
#          conv2d2, 12 blocks of 256) against benches/peer_finetune_ssl.py, which reads the same
#          feature store with numpy.
#
# Metric (as the peers print it): training frames/s = input frames of the optimizer steps per
# second of the training loop (start-up excluded, per-epoch validation included). Also: peak
# resident memory (/usr/bin/time), time to the first optimizer step, epochs, CER.
#
# usage: benches/finetune_vs_peer.sh [--minutes M] [--rounds R] [--config fbank|ssl|both]
#                                    [--utts N] [--ssl-utts N] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=10; rounds=2; which=both; utts=1200; ssl_utts=300; out=bench-out/finetune
while (($#)); do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --config) which=$2; shift 2 ;;
    --utts) utts=$2; shift 2 ;;
    --ssl-utts) ssl_utts=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
py=$(bash ../shared/peers/setup.sh --torch | sed -n 's/^peers ready: //p')
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release -q
bin=$(pwd)/${CARGO_TARGET_DIR:-target}/release/speechcache
mkdir -p "$out"; out=$(cd "$out" && pwd)
dev=$((utts / 12)); [ "$dev" -ge 5 ] || dev=5
corpus=$out/corpus-$utts
[ -f "$corpus/test.jsonl" ] || "$py" benches/make_finetune_corpus.py "$corpus" --train "$utts" --dev "$dev" --test "$dev"

# Once per corpus (what the cache is for): audio stores and fbank features.
for split in train dev test; do
  [ -f "$out/audio-$utts/$split/meta.json" ] || "$bin" prepare --quiet --input "$corpus/$split.jsonl" --out "$out/audio-$utts/$split"
  [ -f "$out/fbank-$utts/$split/meta.json" ] || "$bin" extract --quiet --data "$out/audio-$utts/$split" --model fbank --out "$out/fbank-$utts/$split"
done

peak_mb() { sed -n 's/.*Maximum resident set size (kbytes): //p' "$1" | awk '{printf "%.0f", $1 / 1024}'; }
field() { tr ' ' '\n' < "$1" | sed -n "s/^$2=//p" | tail -1; }

# run_ours NAME TRAIN VALID TEST CONFIG: finetune for the budget, then greedy decode of TEST.
run_ours() {
  local name=$1 train=$2 valid=$3 test=$4 conf=$5 exp=$out/exp-$1
  rm -rf "$exp"
  /usr/bin/time -v -o "$out/$name.time" "$bin" finetune --train "$train" --valid "$valid" \
      --config "$conf" --out "$exp" --max-minutes "$minutes" --seed 1 2> "$out/$name.log" || { tail "$out/$name.log" >&2; exit 1; }
  local fps first epochs cer
  fps=$(sed -n 's/.*: \([0-9]*\) train frames\/s$/\1/p' "$out/$name.log" | tail -1)
  first=$(sed -n 's/.*first step done \([0-9.]*\) s after start.*/\1/p' "$out/$name.log" | tail -1)
  epochs=$(wc -l < "$exp/epoch_log.jsonl")
  cer=$("$bin" decode --quiet --exp "$exp" --data "$test" --beam 1 | sed -n 's/.*CER *\([0-9.]*\) %.*/\1/p' | head -1)
  echo "$fps $(peak_mb "$out/$name.time") $first $epochs $cer"
}

# run_peer NAME ARGS...: the PyTorch script for the budget; parses its last line.
run_peer() {
  local name=$1; shift
  /usr/bin/time -v -o "$out/$name.time" "$py" "$@" --minutes "$minutes" > "$out/$name.log" 2>&1 || { tail "$out/$name.log" >&2; exit 1; }
  local last=$out/$name.last
  tail -1 "$out/$name.log" > "$last"
  local cer; cer=$(field "$last" test_cer); [ "$cer" = nan ] && cer=$(field "$last" dev_cer)
  echo "$(field "$last" train_frames_per_s) $(peak_mb "$out/$name.time") $(field "$last" time_to_first_step_s) $(field "$last" epochs) $(awk -v c="$cer" 'BEGIN{printf "%.2f", 100 * c}')"
}

median() { sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

# compare LABEL OURS_CMD PEER_CMD: alternating rounds, then one markdown table.
compare() {
  local label=$1 ours=$2 peer=$3 rows=() r o p
  for r in $(seq 1 "$rounds"); do
    o=$($ours "$r"); p=$($peer "$r")
    rows+=("$r|$o|$p")
    echo "  round $r: speechcache [fps MB first_s epochs CER%] $o | PyTorch $p" >&2
  done
  local om pm
  om=$(printf '%s\n' "${rows[@]}" | cut -d'|' -f2 | cut -d' ' -f1 | median)
  pm=$(printf '%s\n' "${rows[@]}" | cut -d'|' -f3 | cut -d' ' -f1 | median)
  echo
  echo "### $label: $minutes min per run, $rounds alternating rounds, $(nproc) cores"
  echo
  echo "| round | | train frames/s | peak RSS (MB) | first step (s) | epochs | test CER (%) |"
  echo "|---|---|---|---|---|---|---|"
  for row in "${rows[@]}"; do
    IFS='|' read -r r o p <<< "$row"
    echo "| $r | speechcache | $(echo "$o" | tr ' ' '|' | sed 's/|/ | /g') |"
    echo "| $r | PyTorch | $(echo "$p" | tr ' ' '|' | sed 's/|/ | /g') |"
  done
  echo
  echo "median train frames/s: speechcache $om, PyTorch $pm, ratio $(awk -v a="$om" -v b="$pm" 'BEGIN{printf "%.2f", a / b}')x"
}

if [ "$which" = fbank ] || [ "$which" = both ]; then
  f=$out/fbank-$utts
  ours_fbank() { run_ours "fbank-ours-$1" "$f/train" "$f/dev" "$f/test" benches/conf/fbank_vs_peer.toml; }
  peer_fbank() { run_peer "fbank-peer-$1" ../shared/peers/peer_finetune.py --train "$corpus/train" --dev "$corpus/dev" --test "$corpus/test"; }
  compare "fbank, Conformer 4 x 144 (the finetune issue's config)" ours_fbank peer_fbank
fi

if [ "$which" = ssl ] || [ "$which" = both ]; then
  model=$out/w2v2-base-random
  [ -f "$model/model.safetensors" ] || "$py" -c "
import torch, sys; from transformers import Wav2Vec2Config, Wav2Vec2Model
torch.manual_seed(0); Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(sys.argv[1])" "$model"
  s=$out/ssl-$ssl_utts
  head -n "$ssl_utts" "$corpus/train.jsonl" > "$out/ssl-train.jsonl"
  [ -f "$out/audio-ssl-$ssl_utts/meta.json" ] || "$bin" prepare --quiet --input "$out/ssl-train.jsonl" --out "$out/audio-ssl-$ssl_utts"
  [ -f "$s/train/meta.json" ] || "$bin" extract --quiet --data "$out/audio-ssl-$ssl_utts" --model "$model" --out "$s/train"
  [ -f "$s/dev/meta.json" ] || "$bin" extract --quiet --data "$out/audio-$utts/dev" --model "$model" --out "$s/dev"
  ours_ssl() { run_ours "ssl-ours-$1" "$s/train" "$s/dev" "$s/dev" benches/conf/ssl_vs_peer.toml; }
  peer_ssl() { run_peer "ssl-peer-$1" benches/peer_finetune_ssl.py --train "$s/train" --dev "$s/dev" --max-frames 4000; }
  compare "SSL-base shapes, 13 x 768 -> Conformer 12 x 256 (dev CER: no test split)" ours_ssl peer_ssl
fi
