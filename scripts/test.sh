#!/usr/bin/env bash
# One command for the tests on a fresh machine: sets up .venv (reused when up to date) and the
# browser tests' Chromium and playwright-core, then runs the fast tests and, unless
# DRAGNOISE_FAST=1, the slow ones. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
bash "$repo/scripts/setup_browser.sh"
venv="${DRAGNOISE_VENV:-$repo/.venv}"
py="$venv/bin/python"
export DRAGNOISE_COMFYUI="${DRAGNOISE_COMFYUI:-$venv/ComfyUI}"  # another ComfyUI checkout may be given
# pytest runs from tests/, its rootdir and the home of its ini: the repository root is the pack's
# ComfyUI package, which pytest must not collect (its folder name need not be an identifier), and
# testpaths only applies when pytest starts in the rootdir. Paths given as arguments are relative
# to tests/.
cd "$repo/tests"
pytest=("$py" -m pytest -c pytest.ini --rootdir .)
"${pytest[@]}" -m "not slow" "$@"
if [ "${DRAGNOISE_FAST:-0}" != "1" ]; then
  "${pytest[@]}" -m slow "$@"
fi
