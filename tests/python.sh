#!/usr/bin/env bash
# The Python reader's tests (python/tests): builds stores with the release binary, then reads
# them with pytest in a venv under target/ (reused between runs; SPEECHCACHE_PY_VENV picks
# another). torch is optional: the CPU wheel (~200 MB, 1-2 min) is installed once when it can
# be; when it cannot (no network to download.pytorch.org, or SPEECHCACHE_PY_TORCH=0), the
# Dataset/sampler tests are skipped with a message. A failed attempt is not retried until
# VENV/.no-torch is deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SPEECHCACHE_PY_VENV:-target/python-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q ./python pytest numpy
if [ "${SPEECHCACHE_PY_TORCH:-1}" != 0 ] && [ ! -e "$venv/.no-torch" ] \
    && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if ! "$venv/bin/python" -m pip install -q --retries 1 --timeout 30 torch \
        --index-url https://download.pytorch.org/whl/cpu; then
        touch "$venv/.no-torch"
        echo "python.sh: torch (CPU) could not be installed; the Dataset/sampler tests will be" \
            "skipped (delete $venv/.no-torch to try again)"
    fi
fi

cargo build --release --quiet
bin=target/release/speechcache
stores=target/python-test-stores
rm -rf "$stores"
mkdir -p "$stores"
"$bin" prepare --quiet --input tests/fixtures/interop/librispeech --out "$stores/audio"
for dtype in f32 f16 bf16 int8; do
    "$bin" extract --quiet --data "$stores/audio" --model fbank --num-mel-bins 40 \
        --dtype "$dtype" --out "$stores/fbank_$dtype"
done
"$bin" extract --quiet --data "$stores/audio" --model tests/fixtures/models/w2v_base \
    --dtype f16 --out "$stores/w2v"
"$bin" kmeans --quiet --data "$stores/fbank_f32" --layer 0 --clusters 8 --batch-size 64 \
    --out "$stores/km"
"$bin" units --quiet --data "$stores/fbank_f32" --kmeans "$stores/km" --out "$stores/units"

SPEECHCACHE_TEST_STORES="$stores" "$venv/bin/python" -m pytest -q -rs python/tests
