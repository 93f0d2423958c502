#!/usr/bin/env bash
# One command for the demo on a fresh machine: sets up .venv (reused when up to date), then drags
# an object on the toy model with the pack's nodes on a ComfyUI server and writes the source, the
# edited image with the drag drawn, and a report to out/demo (or the folder given with --out).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
venv="${DRAGNOISE_VENV:-$repo/.venv}"
export DRAGNOISE_COMFYUI="$venv/ComfyUI"
exec "$venv/bin/python" "$repo/toy/demo.py" "$@"
