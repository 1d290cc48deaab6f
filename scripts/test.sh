#!/usr/bin/env bash
# The test command: set-up (see bootstrap.sh), then the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
