#!/usr/bin/env bash
# Sets up the machine and runs the embedded default end to end on the CPU: the toy world, CLIP pretraining,
# CoDe training, evaluation and a comparison figure of test images (outputs under outputs/toy_world by default).
# Runs code-seg from the environment that scripts/setup.sh installed into (the active virtual environment, else .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VIRTUAL_ENV:-$PWD/.venv}
export VIRTUAL_ENV=$VENV PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/code-seg" toy-world "$@"
