#!/usr/bin/env bash
# Set-up shared by scripts/demo.sh and scripts/test.sh: creates .venv when missing, installs
# torch==2.13.0 first (the CPU wheel; any other torch spec pulls gigabytes of CUDA packages),
# then comapoi and its plugin distributions under the pinned default set (constraints/default.txt).
# Re-running is cheap: it reinstalls only when pyproject.toml or the constraints changed.
# COMAPOI_VENV and COMAPOI_CONSTRAINTS choose another venv and dependency set
# (scripts/bootstrap_unsloth.sh uses them for .venv-unsloth under constraints/unsloth.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${COMAPOI_VENV:-.venv}
constraints=${COMAPOI_CONSTRAINTS:-constraints/default.txt}
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.comapoi-installed"
want=$(cat pyproject.toml "$constraints" plugins/*/pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  echo "installing torch==2.13.0" >&2
  "${pip[@]}" torch==2.13.0
  echo "installing comapoi ($constraints) and the Unsloth backend plugin (without Unsloth)" >&2
  "${pip[@]}" -c "$constraints" -e ".[test]" -e plugins/comapoi-unsloth
  echo "$want" > "$stamp"
fi
