#!/usr/bin/env bash
# The test command: set-up (see bootstrap.sh), then the whole test suite on the CPU.
# In CI (CI=true), or with COMAPOI_UNSLOTH_TESTS=1, it also builds .venv-unsloth (the Unsloth
# dependency set with Unsloth itself: about 1.5 minutes and 3 GB the first time, skipped below
# 8 GiB of free disk), so that tests/test_unsloth_plugin.py trains with Unsloth really installed;
# without it those tests are skipped and say how to create it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ "${CI:-}" = "true" ] || [ "${COMAPOI_UNSLOTH_TESTS:-}" = "1" ]; then
  bash scripts/bootstrap_unsloth.sh --if-fits \
    || echo "warning: .venv-unsloth could not be built; the tests that need it are skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
