#!/usr/bin/env bash
# Probe → collapse on the bundled demo corpus: store bytes of the all-layer feature store vs
# the collapsed one-layer store, and the valid-set CER of a finetune on each (same config and
# budget). The SSL model is the test fixture tests/fixtures/models/hubert_base (a tiny
# random-weight HuBERT: 3 hidden states × 32 dims, 400 frames/s), the only SSL checkpoint in the repository:
# the numbers show the pipeline and the bytes, not what a real HuBERT reaches.
# usage: bash benches/probe_collapse_demo.sh [OUT_DIR] [EPOCHS]   (default: bench-out/probe, 15)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/speechcache
out=${1:-bench-out/probe}
epochs=${2:-15}
model=tests/fixtures/models/hubert_base
mkdir -p "$out"
[ -d "$out/audio/train" ] || "$bin" prepare --quiet --input manifests/demo/train.jsonl --out "$out/audio/train" --speed 0.9,1.0,1.1
[ -d "$out/audio/valid" ] || "$bin" prepare --quiet --input manifests/demo/valid.jsonl --out "$out/audio/valid"
for s in train valid; do
    "$bin" extract --quiet --data "$out/audio/$s" --model "$model" --out "$out/all/$s"
done
# the demo's config (conv2d: the fixture's 400 frames/s become 100), a 32-dim freq mask
sed -e 's/^freq_mask_width = 10/freq_mask_width = 4/' \
    -e "s/^max_epochs = 30/max_epochs = $epochs/" manifests/conf/demo_fbank.toml > "$out/all.toml"
sed -e 's/^normalize = "global" .*/normalize = "none"/' "$out/all.toml" > "$out/collapsed.toml"
train() { # store-dir config exp
    [ -f "$3/avg.safetensors" ] || "$bin" finetune --quiet --train "$1/train" --valid "$1/valid" \
        --config "$2" --out "$3" --seed 1
    "$bin" decode --quiet --exp "$3" --data "$1/valid" --beam 10 | grep -E "CER|WER"
}
echo "== all-layer store ($model, every hidden state, f16)"
train "$out/all" "$out/all.toml" "$out/exp-all"
"$bin" layers "$out/exp-all"
for s in train valid; do
    [ -f "$out/collapsed/$s/meta.json" ] || "$bin" collapse --quiet "$out/all/$s" --exp "$out/exp-all" --out "$out/collapsed/$s"
done
# the same rows straight from the audio: extract --collapse (no all-layer cache needed)
"$bin" extract --quiet --data "$out/audio/valid" --model "$model" --collapse "$out/exp-all" --out "$out/extract-collapsed/valid"
echo "== collapsed store (one layer: Σ w_l · normalize_l(h_l) of exp-all)"
train "$out/collapsed" "$out/collapsed.toml" "$out/exp-collapsed"
bytes() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['totals']['bytes'])" "$1/meta.json"; }
for s in train valid; do
    echo "store bytes $s: all-layer $(bytes "$out/all/$s")  collapsed $(bytes "$out/collapsed/$s")"
done
echo "store bytes valid, extract --collapse: $(bytes "$out/extract-collapsed/valid")"
