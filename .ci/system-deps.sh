#!/usr/bin/env bash
# System packages speechcache needs to build and test: cmake (libopus is built from the bundled
# source by opusic-sys), a TrueType font for the training plots, and Slurm + munge for
# tests/slurm.sh (a real single-node Slurm). Installs only what is missing.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
slurm=()
command -v slurmctld >/dev/null 2>&1 || slurm+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || slurm+=(slurmd)
command -v sbatch >/dev/null 2>&1 || slurm+=(slurm-client)
command -v munged >/dev/null 2>&1 || slurm+=(munge)
if ((${#need[@]} + ${#slurm[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  ((${#need[@]})) && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
  ((${#slurm[@]})) && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq \
    --no-install-recommends "${slurm[@]}" >/dev/null
fi
