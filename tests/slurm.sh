#!/usr/bin/env bash
# The Slurm test: starts a real single-node Slurm (munged, slurmctld, slurmd) on this machine,
# runs manifests/slurm/run_pipeline.sh on the demo corpus with 3 parts, kills one extract task
# mid-run, re-runs it alone (sbatch --array=K), finishes the pipeline, compares the merged stores
# row by row with a single-process run, and tears Slurm down (also on failure).
# Skipped (exit 0, with a message) when not root or when Slurm's ports 6817/6818 are taken.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
say() { echo "slurm test: $*"; }
if [ "$(id -u)" -ne 0 ]; then
  say "SKIPPED: needs root to start munged/slurmctld/slurmd"; exit 0
fi
for port in 6817 6818; do
  if ss -ltnH "( sport = :$port )" 2>/dev/null | grep -q .; then
    say "SKIPPED: port $port is taken (another Slurm runs here?)"; exit 0
  fi
done
for cmd in munged slurmctld slurmd sbatch squeue; do
  command -v "$cmd" >/dev/null || { say "FAILED: $cmd missing (bash .ci/system-deps.sh installs Slurm)"; exit 1; }
done

cargo build --release --quiet
bin=$PWD/${CARGO_TARGET_DIR:-target}/release/speechcache
state=$(mktemp -d /var/spool/speechcache-slurm.XXXXXX)
work=$(mktemp -d /tmp/speechcache-slurm-test.XXXXXX)
export SLURM_CONF=$state/slurm.conf
pids=()   # daemons this test started, stopped by pid

teardown() {
  local rc=$?
  squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
  for f in "${pids[@]}"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$state" "$work"
  [ $rc -eq 0 ] && say "passed in $(( $(date +%s) - started )) s" || say "FAILED (exit $rc)"
}
trap teardown EXIT

# --- Slurm up ---------------------------------------------------------------------------
host=$(hostname -s)
mem=$(( $(free -m | awk '/^Mem:/ {print $7}') * 9 / 10 ))
mkdir -p "$state/ctld" "$state/d" "$state/log"
cat > "$SLURM_CONF" <<CONF
ClusterName=speechcache-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SchedulerParameters=sched_min_interval=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
if ! pgrep -u munge -x munged >/dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  pids+=(/run/munge/munged.pid)
fi
slurmctld -f "$SLURM_CONF"; pids+=("$state/slurmctld.pid")
slurmd -f "$SLURM_CONF" -N "$host"; pids+=("$state/slurmd.pid")
for _ in $(seq 100); do
  [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && break; sleep 0.2
done
[ "$(sinfo -h -o %t)" = idle ] || { say "the node did not become idle"; cat "$state/log/"*; exit 1; }
say "Slurm up in $(( $(date +%s) - started )) s (node $host, $(nproc) CPUs)"

# --- helpers ------------------------------------------------------------------------------
wait_idle() {   # until no job of this (private) Slurm is pending or running
  for _ in $(seq 600); do
    [ -z "$(squeue -h -o %i)" ] && return 0; sleep 0.25
  done
  say "jobs still queued after 150 s:"; squeue; return 1
}
rc_of() { cat "$work/status/$1" 2>/dev/null || echo missing; }
# id, text, speaker, duration, length and the CRC-32 of every stored byte of each row, in order
# (shard and offset aside), plus errors.jsonl; `speechcache verify` checks CRCs against bytes
rows() {
  "$bin" verify "$1" >/dev/null
  python3 - "$1" <<'PY'
import json, sys
d = sys.argv[1]
for line in open(d + "/index.jsonl"):
    r = json.loads(line)
    for k in ("shard", "offset"):
        r.pop(k)
    print(json.dumps(r, sort_keys=True))
print(open(d + "/errors.jsonl").read())
PY
}
same_rows() {
  if ! diff <(rows "$1") <(rows "$2") >/dev/null; then
    say "$1 and $2 differ:"; diff <(rows "$1") <(rows "$2") | head -5; return 1
  fi
  say "same rows: $1 = $2 ($(wc -l < "$1/index.jsonl") rows)"
}

# --- the single-process reference ----------------------------------------------------------
export SPEECHCACHE_ENGINE=candle   # the batched tensor path: the one where batches matter
model=$PWD/tests/fixtures/models/hubert_base
extract_args="--dtype f32 --shard-size 48KiB --batch-seconds 3"
ref=$work/ref
for set in train valid; do
  "$bin" prepare --quiet --input "$PWD/manifests/demo/$set.jsonl" --out "$ref/audio/$set"
  # shellcheck disable=SC2086
  "$bin" extract --quiet --data "$ref/audio/$set" --model "$model" --out "$ref/features/$set" $extract_args
done
say "single-process reference done at $(( $(date +%s) - started )) s"

# --- the pipeline, with one extract task killed mid-run ------------------------------------
pipe=$work/pipe
pipeline=(bash manifests/slurm/run_pipeline.sh --work "$pipe" --parts 3
  --train manifests/demo/train.jsonl --valid manifests/demo/valid.jsonl --model "$model"
  --config manifests/conf/demo_fbank.toml --cpu --status-dir "$work/status"
  --prepare-args "--shard-size 1MiB" --extract-args "$extract_args"
  --finetune-args "--max-steps 2 --seed 1" --sbatch-args "--cpus-per-task=1")
SPEECHCACHE=$bin "${pipeline[@]}"
victim=$pipe/features/train.parts/part-2-of-3
for _ in $(seq 6000); do
  [ -f "$victim/shards/00001.seal.json" ] && [ -f "$victim/writer.lock" ] && break; sleep 0.02
done
pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$victim/writer.lock")
kill -9 "$pid"
say "killed extract task 2/3 (pid $pid) after $(ls "$victim/shards" | grep -c seal) sealed shards"
wait_idle
[ "$(rc_of extract-train/extract-2.rc)" = 137 ] || { say "task 2 status: $(rc_of extract-train/extract-2.rc)"; exit 1; }
[ "$(rc_of finetune.rc)" = missing ] || { say "finetune ran after a failed task"; exit 1; }
[ "$(rc_of extract-valid/extract-3.rc)" = 0 ] || { say "the valid set's tasks should be unaffected"; exit 1; }
# merge refuses the incomplete set, naming the part
if out=$("$bin" merge "$pipe"/features/train.parts/part-*-of-3 --out "$work/bad-merge" 2>&1); then
  say "merge accepted an incomplete set"; exit 1
fi
echo "$out" | grep -q "part-2-of-3.*has not finished" || { say "unexpected refusal: $out"; exit 1; }
[ ! -e "$work/bad-merge" ] || { say "a refused merge wrote $work/bad-merge"; exit 1; }
say "merge refused: $out"

# --- re-run the failed task alone; it resumes; then the rest of the pipeline -----------------
job=$(bash "$pipe/rerun/extract-train.sh" 2)
wait_idle
[ "$(rc_of extract-train/extract-2.rc)" = 0 ] || { say "re-run task failed"; cat "$pipe"/logs/extract-train-"$job"_2.out; exit 1; }
grep -q "resuming" "$pipe"/logs/extract-train-"$job"_2.out || { say "the re-run did not resume"; exit 1; }
say "task 2/3 re-run alone (job $job) resumed and finished"
SPEECHCACHE=$bin "${pipeline[@]}"
wait_idle
for f in merge-audio-train merge-audio-valid merge-features-train merge-features-valid finetune; do
  [ "$(rc_of $f.rc)" = 0 ] || { say "$f: exit $(rc_of $f.rc)"; cat "$pipe"/logs/"$f"-*.out; exit 1; }
done
[ -f "$pipe/exp/experiment.json" ] || { say "finetune wrote no experiment"; exit 1; }

# --- the merged stores equal the single-process run --------------------------------------
for set in train valid; do
  same_rows "$pipe/audio/$set" "$ref/audio/$set"
  same_rows "$pipe/features/$set" "$ref/features/$set"
done
python3 - "$pipe/features/train" "$ref/features/train" <<'PY'
import struct, sys, glob, os
# stats/layer_LL.npy: <f8 [2, dim] after a 128-byte header; equal up to summation order
for a in sorted(glob.glob(sys.argv[1] + "/stats/layer_??.npy")):
    b = os.path.join(sys.argv[2], "stats", os.path.basename(a))
    x, y = open(a, "rb").read()[128:], open(b, "rb").read()[128:]
    n = len(x) // 8
    xs, ys = struct.unpack(f"<{n}d", x), struct.unpack(f"<{n}d", y)
    worst = max(abs(p - q) / max(abs(q), 1.0) for p, q in zip(xs, ys))
    assert worst < 1e-9, f"{a}: stats differ by {worst}"
print("slurm test: stats equal (relative error < 1e-9)")
PY
