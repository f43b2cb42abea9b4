#!/usr/bin/env bash
# Creates .venv and installs mlx-gemma3n into it, with the OpenAI-compatible server's extra
# (starlette, uvicorn). `--test` adds the test-only references (torch, torchvision,
# transformers, timm, mlx-vlm, NVRTC, the openai client) and the system tools the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

if [ "$(uname -s)" = "Linux" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    # OpenBLAS makes MLX-CPU float32 matmul ~40x faster (see scripts/test.sh); espeak-ng speaks
    # the real-speech test clip; clang-19 compiles Metal kernel sources for the CPU executor
    # (tests/metal_executor; Debian's default clang 14 has no _Float16 on x86-64).
    pkgs="libopenblas0-pthread"
    [ $with_tests = 1 ] && pkgs="$pkgs espeak-ng clang-19"
    missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    if [ -n "$missing" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ $with_tests = 1 ]; then
    # torchvision (needed by timm) must match torch; these two releases pair up.
    if [ "$(uname -s)" = "Linux" ]; then
        .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    fi
    .venv/bin/python -m pip install -q -e ".[server,test]"
    if [ "$(uname -s)" = "Linux" ]; then
        # MLX's CUDA device headers, for compiling the kernels' CUDA forms with NVRTC in tests.
        .venv/bin/python scripts/mlx_cuda_headers.py
    fi
    # mlx-vlm's own converter makes mlx-community-layout checkpoints in the tests. Its declared
    # requirements (opencv, datasets, fastapi, mlx-audio, ...) serve features the converter does
    # not import; what it does import comes with the test extra.
    .venv/bin/python -m pip install -q --no-deps "mlx-vlm==0.7.10"
else
    .venv/bin/python -m pip install -q -e ".[server]"
fi
