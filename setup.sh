#!/usr/bin/env bash
# Create .venv and install hf_mamba into it (editable), with one extra: "train" (default) or "test".
#
#   ./setup.sh          # for the main job: scripts/selective_copying.py
#   ./setup.sh test     # for the test suite
#
# On a machine without an NVIDIA GPU, torch is installed first as a CPU-only build (a local
# torch==2.13.0+cpu wheel when pip can see one, else PyTorch's CPU index), so the install does
# not pull gigabytes of CUDA libraries; with a GPU, pip resolves torch as usual.
set -euo pipefail
cd "$(dirname "$0")"
extra="${1:-train}"
case "$extra" in train|test) ;; *) echo "usage: ./setup.sh [train|test]" >&2; exit 2 ;; esac

python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
        || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || echo "setup.sh: no CPU-only torch build found; pip will pick torch itself" >&2
fi
"${pip[@]}" -e ".[$extra]"
