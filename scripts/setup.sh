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
