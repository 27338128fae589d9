#!/usr/bin/env bash
# The main job end to end on an embedded default: a tiny random Granite 4.0 model made on
# the spot is exported, verified, served over gRPC, and a chat reply is streamed back.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/granite-deploy demo "$@"
