#!/usr/bin/env bash
# Create .venv (if missing) and install lunaseg with its test tools.
# PyTorch, where no torch is installed yet: the CPU build from PyTorch's CPU index when that
# index can be reached, else pip's own choice (a CPU wheel already at hand, or PyPI's build,
# which on Linux bundles CUDA and is several GB).  LUNASEG_TORCH replaces all of this with
# your own pip arguments, e.g. LUNASEG_TORCH="torch --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
torch_version="torch==2.13.0"
cpu_index=https://download.pytorch.org/whl/cpu
if ! "$py" -c "import torch" 2>/dev/null; then
    if [ -n "${LUNASEG_TORCH:-}" ]; then
        # Word splitting on purpose: the variable may carry pip options.
        # shellcheck disable=SC2086
        "$py" -m pip install -q $LUNASEG_TORCH
    elif "$py" -c "import urllib.request as u; u.urlopen('$cpu_index/torch/', timeout=10)" \
            2>/dev/null; then
        "$py" -m pip install -q --index-url "$cpu_index" "$torch_version"
    else
        "$py" -m pip install -q "$torch_version"
    fi
fi
"$py" -m pip install -q -e ".[test]"
