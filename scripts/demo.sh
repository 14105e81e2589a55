#!/usr/bin/env bash
# Fresh clone -> set up -> run the demo (index a bundled corpus, answer questions from cached passage KV).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/blockrag demo "$@"
