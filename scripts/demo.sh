#!/usr/bin/env bash
# Fresh clone -> set up -> run the demo (index a bundled corpus, answer questions from cached passage KV).
#   bash scripts/demo.sh [--latest] [blockrag demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if [ "${1:-}" = "--latest" ]; then shift; export BLOCKRAG_LATEST=1 VENV=.venv-latest; fi
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/blockrag" demo "$@"
