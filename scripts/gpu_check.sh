#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py says what it runs): about 10 minutes on one GPU.
#   bash scripts/gpu_check.sh [--out DIR]        figures in DIR/gpu_check.json (default gpu-check/)
#   bash scripts/gpu_check.sh --smoke            the same plumbing on the CPU with tiny models
# Python: $PYTHON if set, else the repository's .venv, else a python3 that already has torch (a GPU
# machine's own PyTorch, e.g. one without internet), else a fresh .venv from `pip install -e .[dev]`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then
        PYTHON=.venv/bin/python
    elif python3 -c "import torch, timm, safetensors, huggingface_hub, scipy, skimage, tqdm, yaml" 2>/dev/null; then
        PYTHON=python3
    else
        python3 -m venv .venv && .venv/bin/pip install --quiet -e '.[dev]'
        PYTHON=.venv/bin/python
    fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
