#!/usr/bin/env bash
# Installs the stack and what its tests need. torch goes first: on a CPU machine the pinned
# CPU build installs from a local file in seconds, and nothing installed after it pulls a newer
# (CUDA, several GB) torch. On a GPU machine an existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")"
if ! python -c "import torch" 2>/dev/null; then
  pip install torch==2.13.0
fi
pip install -r requirements.txt
pip install --no-deps -e .
