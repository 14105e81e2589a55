#!/usr/bin/env bash
# Fresh clone -> set up -> run the test suite (CPU only; GPU tests skip themselves).
#   bash scripts/test.sh            environment from requirements.lock (.venv)
#   bash scripts/test.sh --latest   the newest releases the ranges admit, in a separate .venv-latest
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if [ "${1:-}" = "--latest" ]; then shift; export BLOCKRAG_LATEST=1 VENV=.venv-latest; fi
BLOCKRAG_EXTRAS=${BLOCKRAG_EXTRAS:-graph,serve,finetune,test,ray,llamaindex} bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest -q -ra "$@"
