#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
# PostgreSQL must be reachable on 127.0.0.1:5432 (the store suite fails, never skips, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ".[test,local]"
# The web page tests drive Debian's chromium (they fail, never skip, without it).
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q chromium || { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; }
fi
.venv/bin/ruff check src tests bench
.venv/bin/mypy  # strict, on src/ ([tool.mypy] in pyproject.toml)
set +e
.venv/bin/python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
