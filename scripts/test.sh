#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs the whole test suite offline, from the environment that
# scripts/setup.sh installed into (the active virtual environment, else .venv). Arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not slow"` for the fast lane.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VIRTUAL_ENV:-$PWD/.venv}
export VIRTUAL_ENV=$VENV PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest -q "$@"
