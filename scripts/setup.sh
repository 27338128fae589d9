#!/usr/bin/env bash
# Create .venv (if needed) and install granite-deploy with every extra the demo and tests use.
# torch is pinned to 2.13.0 in the `export` extra: the CPU wheel, never the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
# Our AVX2 4-bit CPU kernel (engines/kernels): ONNX Runtime's headers from Debian's package, compiled
# with g++ into ~/.cache/granite-deploy/kernels. Without it the engine runs ONNX Runtime's own kernels.
.venv/bin/python -m granite_deploy.engines.kernels > /dev/null \
    || echo "setup: CPU kernels not built (see above); 4-bit artifacts will run on ONNX Runtime's MatMulNBits" >&2
