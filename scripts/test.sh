#!/usr/bin/env bash
# Installs PriorFace with its test dependencies and runs the test suite on CPU.
# torch comes first from its pinned CPU-compatible build, so no dependency pulls another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet -e ".[dev,faces,priors,diffusion,batch,demo]"
python -m ruff check .
python -m pytest "$@"
