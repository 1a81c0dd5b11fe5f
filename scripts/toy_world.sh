#!/usr/bin/env bash
# Sets up the machine and runs the embedded default end to end on the CPU: the toy world, CLIP pretraining,
# CoDe training, evaluation and an overlay of a test image (outputs under outputs/toy_world by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec code-seg toy-world "$@"
