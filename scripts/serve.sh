#!/usr/bin/env bash
# Set up (first run) and start the server on the embedded SQLite store. Args go to `threadline serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ".[local]"
exec .venv/bin/threadline serve "$@"
