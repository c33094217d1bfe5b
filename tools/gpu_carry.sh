#!/usr/bin/env bash
# What tools/gpu_check.sh needs on a bare GPU machine that cannot reach any
# package index, gathered here into .gpu/ (ignored by git; the device tool's
# `carry` takes it along):
#
#   tools/gpu_carry.sh            (env: PYLLAMA_GPU_PYTHON=3.12, the machine's Python)
#
#   .gpu/whl/*.whl      the Python packages the machine's image lacks, for its
#                       Python and manylinux x86_64: cffi and pycparser (the
#                       binding's build and runtime), gguf (tests/synth.py),
#                       platformdirs, and the server extra (starlette, uvicorn,
#                       pydantic and pydantic-core, annotated-types,
#                       typing-inspection). What the image already has (numpy,
#                       httpx, pytest, scikit-build-core, cmake, ninja, filelock,
#                       anyio, h11, pyyaml, tqdm, typing-extensions) is not carried.
#   .gpu/vendor.tar.xz  the vendored llama.cpp tree without what no build reads
#                       (git data, models, docs, media, the web UI, gguf-py,
#                       other backends' shader sources stay: CMake lists them).
#
# Prints the sizes: the working tree and .gpu/ must stay under the device
# tool's 64 MiB together.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
pyver=${PYLLAMA_GPU_PYTHON:-3.12}
log() { echo "gpu_carry: $*" >&2; }

[ -f vendor/llama.cpp/include/llama.h ] || "$py" tools/vendor.py

rm -rf .gpu/whl
mkdir -p .gpu/whl
# One version of each (two stop the install there); --no-deps: each need is named.
pkgs=(cffi pycparser gguf platformdirs starlette uvicorn pydantic pydantic-core annotated-types
      typing-inspection)
plats=()
for n in 17 27 28 31 34 35; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
plats+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
log "downloading ${pkgs[*]} for CPython $pyver (manylinux x86_64)"
dl() {
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${plats[@]}" -d .gpu/whl "$@"
}
dl "${pkgs[@]}"
# pydantic pins its core exactly; the newest core may be a later one
core=$(unzip -p .gpu/whl/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([^ ;]*\).*/\1/p')
if [ -n "$core" ] && ! ls .gpu/whl/pydantic_core-"$core"-* >/dev/null 2>&1; then
  rm -f .gpu/whl/pydantic_core-*
  dl "pydantic-core==$core"
fi

log "packing vendor/llama.cpp"
tar -C vendor -cJf .gpu/vendor.tar.xz \
  --exclude=llama.cpp/.git --exclude=llama.cpp/models --exclude=llama.cpp/docs --exclude=llama.cpp/media \
  --exclude=llama.cpp/gguf-py --exclude=llama.cpp/tools/server/webui --exclude=llama.cpp/tools/server/public \
  --exclude=llama.cpp/tools/ui/node_modules --exclude=llama.cpp/.github --exclude=llama.cpp/tests \
  --exclude='*.gguf' llama.cpp

tree_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
carry_bytes=$(du -sb .gpu | cut -f1)
total=$(( tree_bytes + carry_bytes ))
log "working tree $(( tree_bytes >> 20 )) MiB + .gpu $(( carry_bytes >> 20 )) MiB = $(( total >> 20 )) MiB (limit 64)"
ls -la .gpu/whl >&2
if [ "$total" -gt $(( 64 << 20 )) ]; then
  log "over the 64 MiB a device call carries"; exit 1
fi
echo "$root/.gpu"
