#!/usr/bin/env bash
# Submits the whole speechcache pipeline to Slurm as dependent jobs and prints their ids:
#   for each of train and valid: prepare array (N parts) → merge → extract array → merge;
#   then finetune on the merged feature stores.
# Jobs are chained with --dependency=afterok and --kill-on-invalid-dep=yes: when a task fails,
# everything after it is cancelled. Re-run the failed task alone with the command printed (or
# WORK/rerun/STEP-SET.sh K; it resumes), then this script again with the same arguments:
# finished parts and merges are found complete and skipped.
#
# usage: run_pipeline.sh --work DIR --parts N --train MANIFEST --valid MANIFEST
#            --model PATH|fbank --config CONF.toml
#            [--cpu] [--prepare-args "..."] [--extract-args "..."] [--finetune-args "..."]
#            [--sbatch-args "..."] [--status-dir DIR]
#   --cpu          extract tasks ask for no GPU (sbatch --gres=none) and run on their CPUs
#   --sbatch-args  added to every sbatch (e.g. "--partition=gpu --time=12:00:00")
#   --status-dir   each task writes its exit status there (STEP-K.rc per set, merge-*.rc, ...)
# The speechcache binary: $SPEECHCACHE, else speechcache on the PATH (it must be reachable from
# the compute nodes, as must WORK and the inputs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
work="" parts="" train="" valid="" model="" config="" cpu=0 status=""
prepare_args="" extract_args="" finetune_args="" sbatch_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --work) work=$2; shift 2 ;;
    --parts) parts=$2; shift 2 ;;
    --train) train=$2; shift 2 ;;
    --valid) valid=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --prepare-args) prepare_args=$2; shift 2 ;;
    --extract-args) extract_args=$2; shift 2 ;;
    --finetune-args) finetune_args=$2; shift 2 ;;
    --sbatch-args) sbatch_args=$2; shift 2 ;;
    --status-dir) status=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "run_pipeline.sh: unknown argument $1" >&2; usage ;;
  esac
done
for v in work parts train valid model config; do
  [ -n "${!v}" ] || { echo "run_pipeline.sh: --$v is required" >&2; usage; }
done
abs() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
work=$(abs "$work"); config=$(abs "$config")
[ "$model" = fbank ] || model=$(abs "$model")
bin=${SPEECHCACHE:-$(command -v speechcache || true)}
[ -n "$bin" ] || { echo "run_pipeline.sh: set SPEECHCACHE or put speechcache on the PATH" >&2; exit 2; }
export SPEECHCACHE=$bin
mkdir -p "$work/logs" "$work/rerun"
[ -n "$status" ] && status=$(abs "$status") && mkdir -p "$status"
gres=()
[ "$cpu" = 1 ] && gres=(--gres=none)
# shellcheck disable=SC2206  # the *-args strings are split into words on purpose
common=(--parsable --kill-on-invalid-dep=yes --output="$work/logs/%x-%A_%a.out" $sbatch_args)

# submit NAME DEPENDENCY sbatch-args... → job id; also writes WORK/rerun/NAME.sh for arrays
submit() {
  local name=$1 dep=$2; shift 2
  local deps=()
  [ -n "$dep" ] && deps=(--dependency="afterok:$dep")
  local status_env=()
  [ -n "$status" ] && mkdir -p "$status/$name" && status_env=(SPEECHCACHE_STATUS_DIR="$status/$name")
  env "${status_env[@]}" sbatch "${common[@]}" --job-name="$name" "${deps[@]}" "$@"
}
# a one-line job that records its exit status as STATUS/NAME.rc
wrap() {
  local name=$1 command=$2
  if [ -n "$status" ]; then
    command="$command; rc=\$?; echo \$rc > '$status/$name.rc'; exit \$rc"
  fi
  echo "$command"
}

declare -A merged_features
for set in train valid; do
  manifest=$(abs "$([ "$set" = train ] && echo "$train" || echo "$valid")")
  audio_parts=$work/audio/$set.parts features_parts=$work/features/$set.parts
  audio=$work/audio/$set features=$work/features/$set
  # shellcheck disable=SC2086
  prep_args=(--array="1-$parts" "$here/prepare.sbatch" "$parts" "$audio_parts" --input "$manifest" $prepare_args)
  prep=$(submit "prepare-$set" "" "${prep_args[@]}")
  printf 'SPEECHCACHE=%q SPEECHCACHE_STATUS_DIR=%q sbatch --parsable --array="${1:?task K}" --job-name=%q --output=%q %s %q %q %q --input %q %s\n' \
    "$bin" "${status:+$status/prepare-$set}" "prepare-$set" "$work/logs/%x-%A_%a.out" "$sbatch_args" "$here/prepare.sbatch" "$parts" "$audio_parts" "$manifest" "$prepare_args" \
    > "$work/rerun/prepare-$set.sh"
  merge_a=$(submit "merge-audio-$set" "$prep" \
    --wrap="$(wrap "merge-audio-$set" "'$bin' merge '$audio_parts'/part-*-of-$parts --out '$audio'")")
  # shellcheck disable=SC2086
  ext=$(submit "extract-$set" "$merge_a" "${gres[@]}" --array="1-$parts" \
    "$here/extract.sbatch" "$parts" "$audio" "$features_parts" --model "$model" $extract_args)
  printf 'SPEECHCACHE=%q SPEECHCACHE_STATUS_DIR=%q sbatch --parsable --array="${1:?task K}" --job-name=%q --output=%q %s %s %q %q %q %q --model %q %s\n' \
    "$bin" "${status:+$status/extract-$set}" "extract-$set" "$work/logs/%x-%A_%a.out" "$sbatch_args" "${gres[*]}" "$here/extract.sbatch" "$parts" "$audio" "$features_parts" "$model" "$extract_args" \
    > "$work/rerun/extract-$set.sh"
  merge_f=$(submit "merge-features-$set" "$ext" \
    --wrap="$(wrap "merge-features-$set" "'$bin' merge '$features_parts'/part-*-of-$parts --out '$features'")")
  merged_features[$set]=$merge_f
  echo "$set: prepare $prep (array 1-$parts) -> merge $merge_a -> extract $ext (array 1-$parts) -> merge $merge_f"
  echo "  re-run a failed task K: bash $work/rerun/prepare-$set.sh K  |  bash $work/rerun/extract-$set.sh K"
done
exp=$work/exp
finetune=$(submit finetune "${merged_features[train]}:${merged_features[valid]}" \
  --wrap="$(wrap finetune "resume=''; [ -f '$exp/experiment.json' ] && resume=--resume; '$bin' finetune --train '$work/features/train' --valid '$work/features/valid' --config '$config' --out '$exp' \$resume $finetune_args")")
echo "finetune: $finetune (after ${merged_features[train]} and ${merged_features[valid]}) -> $exp"
echo "logs: $work/logs/"
