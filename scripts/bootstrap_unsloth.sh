#!/usr/bin/env bash
# Creates .venv-unsloth (or $COMAPOI_UNSLOTH_VENV): comapoi under the Unsloth dependency set
# (constraints/unsloth.txt: transformers 5.17.0, trl 1.15.0, datasets 4.8.5), then Unsloth itself,
# installed as plugins/comapoi-unsloth/README.md documents (torch pinned to the torch installed).
# With a CPU build of torch it then removes torchvision: PyPI has no CPU build of it, and the CUDA build that
# Unsloth pulls in cannot load against a CPU torch (Unsloth then refuses to import). Unsloth
# itself runs on the CPU (its CPU fallback), so the plugin's tests can train with it.
#
#   bash scripts/bootstrap_unsloth.sh             # about 1.5 minutes and 3 GB the first time
#   bash scripts/bootstrap_unsloth.sh --if-fits   # the same, skipped (exit 0) below 8 GiB free disk
#
# Re-running is cheap: it reinstalls only when the constraints or the plugin's pyproject changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${COMAPOI_UNSLOTH_VENV:-.venv-unsloth}
if [ "${1:-}" = "--if-fits" ]; then
  free_kib=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "$free_kib" -lt $((8 * 1024 * 1024)) ]; then
    echo "not creating $venv: $((free_kib / 1024 / 1024)) GiB of disk free, it needs about 3 (8 asked for)" >&2
    exit 0
  fi
fi
COMAPOI_VENV=$venv COMAPOI_CONSTRAINTS=constraints/unsloth.txt bash scripts/bootstrap.sh
stamp="$venv/.comapoi-unsloth-installed"
want=$(cat constraints/unsloth.txt plugins/comapoi-unsloth/pyproject.toml scripts/bootstrap_unsloth.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  py="$venv/bin/python"
  torch_version=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
  echo "installing Unsloth into $venv (constraints/unsloth.txt; torch stays $torch_version)" >&2
  "$py" -m pip install --quiet --disable-pip-version-check -c constraints/unsloth.txt \
    -e "./plugins/comapoi-unsloth[unsloth]" "torch==$torch_version"
  if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' \
     && "$py" -m pip show --quiet torchvision >/dev/null 2>&1; then
    echo "removing torchvision from $venv (a CUDA build that a CPU torch cannot load)" >&2
    "$py" -m pip uninstall --quiet --yes torchvision
  fi
  echo "$want" > "$stamp"
fi
