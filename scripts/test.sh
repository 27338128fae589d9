#!/usr/bin/env bash
# Install everything, then run the whole test suite (TensorRT tests skip, with the reason, without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -rs "$@"
