#!/usr/bin/env bash
# Create .venv (if missing) and install lunaseg with its test tools.
# PyTorch: where no torch is installed yet, take the CPU build first (pip would otherwise
# pull a multi-GB CUDA build where a CPU wheel is not already at hand); set LUNASEG_TORCH to
# choose another requirement, e.g. a CUDA build on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q "${LUNASEG_TORCH:-torch==2.13.0}"
fi
"$py" -m pip install -q -e ".[test]"
