#!/usr/bin/env bash
# The main job on the bundled demo corpus, as a user runs it:
#   prepare (decode + resample, speed perturbation on train) → extract (Kaldi fbank)
#   → finetune (Conformer-CTC, manifests/conf/demo_fbank.toml) → decode (CER/WER).
# usage: bash manifests/demo/run.sh [OUT_DIR]        (default: demo-out/)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/system-deps.sh
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/speechcache
out=${1:-demo-out}
"$bin" prepare --input manifests/demo/train.jsonl --out "$out/audio/train" --speed 0.9,1.0,1.1
"$bin" prepare --input manifests/demo/valid.jsonl --out "$out/audio/valid"
"$bin" extract --data "$out/audio/train" --model fbank --out "$out/fbank/train"
"$bin" extract --data "$out/audio/valid" --model fbank --out "$out/fbank/valid"
resume=()   # a rerun continues (or finds finished) the experiment instead of refusing it
[ -f "$out/exp/experiment.json" ] && resume=(--resume)
"$bin" finetune --train "$out/fbank/train" --valid "$out/fbank/valid" \
    --config manifests/conf/demo_fbank.toml --out "$out/exp" --seed 1 "${resume[@]}"
"$bin" decode --exp "$out/exp" --data "$out/fbank/valid" --beam 10
