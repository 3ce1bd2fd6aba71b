#!/usr/bin/env bash
# speechcache kmeans vs scikit-learn's MiniBatchKMeans (fairseq simple_kmeans' settings) on the
# same frames, same K, same mini-batch options, on this machine's cores, alternating rounds.
# Both sides are timed whole-process (speechcache: the command a user runs; sklearn: load the
# layer's frames with numpy through the reader, fit). Both inertias are computed by the Python
# script over the same frames (float64), so the comparison does not trust our own number.
# Run it on an idle machine.
#
# usage: benches/kmeans_vs_sklearn.sh [--utts N] [--clusters "100 500"] [--rounds R] [--out DIR]
#                                    [--store FEATURE_STORE]  (layer 0 of an existing store instead)
#   data: the finetune bench's synthetic Mandarin corpus (espeak-ng), N train utterances,
#   80-dim Kaldi fbank (HuBERT's first-iteration targets are k-means of MFCCs).
set -euo pipefail
cd "$(dirname "$0")/.."
utts=300 clusters="100 500" rounds=2 out=${TMPDIR:-/tmp}/speechcache-kmeans-bench store=""
while [ $# -gt 0 ]; do
  case $1 in
    --utts) utts=$2; shift 2 ;;
    --clusters) clusters=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --store) store=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
py=$(bash ../shared/peers/setup.sh | sed -n 's/^peers ready: //p')
"$py" -c "import sklearn" 2>/dev/null || "$(dirname "$py")/pip" install -q "scikit-learn==1.5.2"
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release -q
bin=$(pwd)/${CARGO_TARGET_DIR:-target}/release/speechcache
mkdir -p "$out"; out=$(cd "$out" && pwd)
if [ -z "$store" ]; then
  corpus=$out/corpus-$utts
  [ -f "$corpus/train.jsonl" ] || "$py" benches/make_finetune_corpus.py "$corpus" --train "$utts" --dev 5 --test 5
  [ -f "$out/audio-$utts/meta.json" ] || "$bin" prepare --quiet --input "$corpus/train.jsonl" --out "$out/audio-$utts"
  store=$out/fbank-$utts
  [ -f "$store/meta.json" ] || "$bin" extract --quiet --data "$out/audio-$utts" --model fbank --dtype f32 --out "$store"
fi
opts="--seed 1 --batch-size 10000 --max-iter 100 --max-no-improvement 100 --n-init 3"
peak_mb() { sed -n 's/.*Maximum resident set size (kbytes): //p' "$1" | awk '{printf "%.0f", $1 / 1024}'; }
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }
echo "layer 0 of $store, $(nproc) cores; options: $opts"
printf '%-4s %-6s %-12s %10s %10s %18s\n' K round side seconds "RSS MB" "inertia/frame"
for k in $clusters; do
  for r in $(seq 1 "$rounds"); do
    rm -rf "$out/km-$k"
    s0=$(date +%s.%N)
    /usr/bin/time -v -o "$out/ours.time" "$bin" kmeans --quiet --data "$store" --layer 0 --clusters "$k" $opts --out "$out/km-$k"
    ours_s=$(echo "$(date +%s.%N) - $s0" | bc)
    ours=$("$py" benches/kmeans_sklearn.py score "$store" 0 "$out/km-$k/centroids.npy")
    peer=$(/usr/bin/time -v -o "$out/peer.time" "$py" benches/kmeans_sklearn.py fit "$store" 0 "$k" $opts)
    n=$(field "$ours" frames)
    printf '%-4s %-6s %-12s %10.2f %10s %18.4f   (%s frames, %s steps)\n' "$k" "$r" speechcache "$ours_s" "$(peak_mb "$out/ours.time")" "$(echo "$(field "$ours" inertia) / $n" | bc -l)" "$n" "$(sed -n 's/.*"steps": \([0-9]*\).*/\1/p' "$out/km-$k/kmeans.json")"
    printf '%-4s %-6s %-12s %10.2f %10s %18.4f   (fit %s s, %s steps)\n' "$k" "$r" sklearn "$(field "$peer" seconds)" "$(peak_mb "$out/peer.time")" "$(echo "$(field "$peer" inertia) / $n" | bc -l)" "$(field "$peer" fit_s)" "$(field "$peer" steps)"
  done
done
