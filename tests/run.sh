#!/usr/bin/env bash
# The test command of the README: install missing system packages, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/system-deps.sh
cargo test --release
bash tests/python.sh
