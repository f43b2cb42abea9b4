#!/usr/bin/env bash
# Runs the test suite in .venv (made by scripts/setup.sh --test).
set -euo pipefail
cd "$(dirname "$0")/.."
blas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ "$(uname -s)" = "Linux" ] && [ -e "$blas" ]; then
    export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}"
fi
exec .venv/bin/python -m pytest -q "$@"
