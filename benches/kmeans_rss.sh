#!/usr/bin/env bash
# kmeans on a feature store several times larger than the memory it may use: builds a ~3.5 GB
# float32 feature store (the demo corpus repeated --copies times, as 200-dim fbank at 500
# frames/s), runs `speechcache kmeans` over all of it inside a memory cgroup limited to
# --limit-mb (cgroup v1 or v2, when this user may create one; otherwise unlimited), and checks
# that it finishes and that its peak RSS (/usr/bin/time -v) stays under --limit-mb. Memory, not
# speed: it may run on a busy machine. The big store is deleted afterwards unless --keep.
#
# usage: benches/kmeans_rss.sh [--copies 28] [--limit-mb 1024] [--clusters 100] [--out DIR] [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
copies=28 limit_mb=1024 clusters=100 out=${TMPDIR:-/tmp}/speechcache-kmeans-rss keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --copies) copies=$2; shift 2 ;;
    --limit-mb) limit_mb=$2; shift 2 ;;
    --clusters) clusters=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release -q
bin=$(pwd)/${CARGO_TARGET_DIR:-target}/release/speechcache
mkdir -p "$out"; out=$(cd "$out" && pwd)
demo=$(pwd)/manifests/demo
# the demo's 150 utterances, --copies times under distinct ids (same audio files)
python3 - "$demo" "$copies" > "$out/big.jsonl" <<'PY'
import json, sys
demo, copies = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for f in ("train.jsonl", "valid.jsonl") for l in open(f"{demo}/{f}")]
for c in range(copies):
    for r in rows:
        print(json.dumps(dict(r, id=f"{r['id']}-c{c:03d}", path=f"{demo}/{r['path']}")))
PY
[ -f "$out/audio/meta.json" ] || "$bin" prepare --quiet --input "$out/big.jsonl" --out "$out/audio"
store=$out/feats
[ -f "$store/meta.json" ] || "$bin" extract --quiet --data "$out/audio" --model fbank --dtype f32 \
    --num-mel-bins 200 --frame-shift 2 --frame-length 50 --low-freq 300 --out "$store"
store_bytes=$(du -sb "$store" | cut -f1)
frames=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['totals']['length'])" "$store/meta.json")
echo "feature store: $store_bytes bytes on disk, $frames frames × 200 dims float32"

# a memory cgroup for the kmeans process, when one can be made here
cg=""
if [ -w /sys/fs/cgroup/memory ]; then                       # cgroup v1
  cg=/sys/fs/cgroup/memory/speechcache-kmeans-rss-$$
  mkdir "$cg" && echo $((limit_mb << 20)) > "$cg/memory.limit_in_bytes"
  [ -e "$cg/memory.memsw.limit_in_bytes" ] && echo $((limit_mb << 20)) > "$cg/memory.memsw.limit_in_bytes" || true
elif [ -w /sys/fs/cgroup/cgroup.subtree_control ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then  # v2
  cg=/sys/fs/cgroup/speechcache-kmeans-rss-$$
  mkdir "$cg" && echo $((limit_mb << 20)) > "$cg/memory.max" && echo 0 > "$cg/memory.swap.max" 2>/dev/null || true
fi
cleanup() { [ -n "$cg" ] && rmdir "$cg" 2>/dev/null || true; [ "$keep" = 1 ] || rm -rf "$out"; }
trap cleanup EXIT
[ -n "$cg" ] && echo "memory cgroup $cg: limit $limit_mb MiB" || echo "no memory cgroup available: peak RSS only"
rm -rf "$out/km"
set +e
sh -c '[ -n "$1" ] && echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$cg" \
  /usr/bin/time -v -o "$out/time.txt" "$bin" kmeans --quiet --data "$store" --layer 0 \
    --clusters "$clusters" --seed 0 --batch-size 10000 --max-iter 1 --n-init 1 --out "$out/km"
rc=$?
set -e
peak_kb=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$out/time.txt")
wall=$(sed -n 's/.*Elapsed (wall clock) time.*: //p' "$out/time.txt")
cg_peak=""
[ -n "$cg" ] && [ -e "$cg/memory.max_usage_in_bytes" ] && cg_peak=$(cat "$cg/memory.max_usage_in_bytes")
[ -n "$cg" ] && [ -e "$cg/memory.peak" ] && cg_peak=$(cat "$cg/memory.peak")
echo "kmeans: exit $rc, peak RSS $((peak_kb / 1024)) MiB, store $((store_bytes >> 20)) MiB ($(( store_bytes / (peak_kb * 1024) ))x the peak RSS), cgroup peak (incl. page cache) ${cg_peak:-n/a} bytes, wall $wall"
[ -f "$out/km/kmeans.json" ] && python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('kmeans.json: frames', m['frames'], 'inertia/frame', round(m['inertia_per_frame'], 2))" "$out/km/kmeans.json"
[ "$rc" = 0 ] || { echo "FAIL: kmeans exited $rc (killed by the memory limit?)"; exit 1; }
[ "$peak_kb" -lt $((limit_mb * 1024)) ] || { echo "FAIL: peak RSS over $limit_mb MiB"; exit 1; }
[ "$store_bytes" -gt $((3 * limit_mb << 20)) ] || echo "note: the store is less than 3x the limit (raise --copies)"
echo "PASS: peak RSS under $limit_mb MiB on a $((store_bytes >> 20)) MiB store"
