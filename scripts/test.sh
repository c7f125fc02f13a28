#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$(pwd)/.venv/bin:$PATH"
exec python -m pytest "$@"
