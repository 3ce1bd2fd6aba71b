#!/usr/bin/env bash
# The test command of the README: install missing system packages, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/system-deps.sh
# the fuzz targets (tests/fuzz_*.rs, fuzz_units.rs included) run PROPTEST_CASES cases each: about 2 minutes in all
PROPTEST_CASES=${PROPTEST_CASES:-20000} cargo test --release
bash tests/python.sh
bash tests/slurm.sh        # a real single-node Slurm: the pipeline in 3 parts vs one process (~70 s)
bash tests/cuda_build.sh   # the CUDA build (no GPU needed): compiled and tested against a driver stub
