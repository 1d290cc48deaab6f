#!/usr/bin/env bash
# The main job on the embedded default, on the CPU: set-up (see bootstrap.sh), then the whole
# pipeline on generated sample data and a tiny model built offline. Outputs go to ./demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
comapoi=.venv/bin/comapoi
demo=${COMAPOI_DEMO_DIR:-demo}
echo "== comapoi env"; $comapoi env
echo "== comapoi plugins list"; $comapoi plugins list
