#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs the whole test suite offline, from the environment that
# scripts/setup.sh installed into (the active virtual environment, else .venv). Arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not slow"` for the fast lane.
#
# The tests marked cuda need a GPU: they are deselected, and a -m expression given here is combined with
# "not cuda" (pytest keeps only the last -m), unless it names cuda itself (`-m cuda` on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VIRTUAL_ENV:-$PWD/.venv}
export VIRTUAL_ENV=$VENV PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

arguments=()
selected=0
while (($#)); do
  case $1 in
    -m)
      if (($# < 2)); then arguments+=("$1"); shift; continue; fi  # pytest names the missing expression
      expression=$2; shift 2 ;;
    -m?*) expression=${1#-m}; shift ;;
    *) arguments+=("$1"); shift; continue ;;
  esac
  selected=1
  if [[ $expression == *cuda* ]]; then
    arguments+=(-m "$expression")
  else
    arguments+=(-m "($expression) and not cuda")
  fi
done
((selected)) || arguments+=(-m "not cuda")
exec "$VENV/bin/python" -m pytest -q "${arguments[@]}"
