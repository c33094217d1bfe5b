#!/usr/bin/env bash
# Compile-and-link proof of pyllama's CUDA variant, for ONE GPU architecture,
# with a CUDA toolkit assembled from package registries.
#
#   tools/build_cuda.sh            (env: PYLLAMA_CUDA_ARCH=90, PYLLAMA_CUDA_TIME_LIMIT=seconds)
#
# The machine has nvcc and the CUDA runtime (headers, libcudart) but no cuBLAS
# and no driver. This script:
#   1. takes cuBLAS (headers and libraries) from NVIDIA's wheel on PyPI that
#      matches nvcc's major.minor (CUDA 13: `nvidia-cublas==13.<minor>.*`,
#      CUDA 12: `nvidia-cublas-cu12==12.<minor>.*`), installed with pip into
#      build/cuda-toolkit/site (never into an environment), and gives its
#      versioned libraries the unversioned names the linker looks for;
#   2. where no libcuda.so exists (no driver installed), makes a link stub for
#      it the way the toolkit's stubs/libcuda.so is made: a library with the
#      soname libcuda.so.1 that exports every function cuda.h declares (names
#      taken from the preprocessed header, so cuMemAlloc -> cuMemAlloc_v2);
#   3. configures CMake directly (no wheel: this is a link proof) with
#      PYLLAMA_BACKEND=cuda, CMAKE_CUDA_ARCHITECTURES=$PYLLAMA_CUDA_ARCH, the
#      cuBLAS include directory and libraries handed to FindCUDAToolkit, and
#      -Wl,--no-undefined on every shared library, so "it links" means every
#      symbol of libggml-cuda.so resolved against cudart, cuBLAS and the driver API;
#   4. builds in build/cuda under `flock /tmp/pyllama-build.lock` (ccache on),
#      and prints the time (from when the lock is held), the ninja progress
#      reached and what libggml-cuda.so needs at run time. gcc/g++ are named
#      explicitly, as scikit-build-core does, so ccache shares objects with the
#      wheel builds (the CPU variants).
# With PYLLAMA_CUDA_TIME_LIMIT set, the build is stopped after that many
# seconds and the script reports how far it got and the measured rate.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
arch=${PYLLAMA_CUDA_ARCH:-90}
bdir=$root/build/cuda
tk=$root/build/cuda-toolkit
log() { echo "build_cuda: $*" >&2; }
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$root}  # as the wheel scripts: objects shared across clones
export CCACHE_NOHASHDIR=1

py=${PYTHON:-python3}
"$py" -c "import cffi" 2>/dev/null || { log "$py lacks cffi (the binding generator needs it): pip install cffi"; exit 1; }
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  log "cmake and ninja are needed: pip install cmake ninja"; exit 1
fi
[ -f vendor/llama.cpp/include/llama.h ] || "$py" tools/vendor.py

# --- the CUDA compiler and its toolkit root -----------------------------------
nvcc=${CUDACXX:-$(command -v nvcc || true)}
[ -n "$nvcc" ] || { log "nvcc not found (set CUDACXX)"; exit 1; }
# /usr/local/bin/nvcc may be a wrapper script: ask nvcc itself where it lives.
nvcc_real=$("$nvcc" --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=\(.*\)$/\1/p' | head -n1)
if [ -n "$nvcc_real" ] && [ -x "$nvcc_real/bin/nvcc" ]; then
  cuda_root=$(cd "$nvcc_real" && pwd -P)
else
  cuda_root=$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd -P)
fi
nvcc="$cuda_root/bin/nvcc"
cuda_ver=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
major=${cuda_ver%%.*}
minor=${cuda_ver#*.}
log "nvcc $cuda_ver at $cuda_root; target sm_$arch"

# --- 1. cuBLAS from PyPI --------------------------------------------------------
case "$major" in
  13) cublas_req="nvidia-cublas==13.$minor.*"; wheel_root="$tk/site/nvidia/cu13" ;;
  12) cublas_req="nvidia-cublas-cu12==12.$minor.*"; wheel_root="$tk/site/nvidia/cublas" ;;
  *) log "CUDA $cuda_ver: no cuBLAS wheel mapping (12 and 13 are known)"; exit 1 ;;
esac
if [ ! -f "$wheel_root/include/cublas_v2.h" ]; then
  log "pip install --no-deps --target $tk/site '$cublas_req'"
  rm -rf "$tk/site"
  "$py" -m pip install --quiet --no-deps --target "$tk/site" "$cublas_req"
fi
cublas_info=("$tk"/site/nvidia_cublas*.dist-info)
cublas_ver=$(basename "${cublas_info[0]}" .dist-info)
cublas_ver=${cublas_ver##*-}
mkdir -p "$tk/lib/stubs"
for name in cublas cublasLt; do
  versioned=("$wheel_root/lib/lib$name.so."*)
  ln -sfn "${versioned[0]}" "$tk/lib/lib$name.so"
done
cublas_inc="$wheel_root/include"
log "cuBLAS $cublas_ver: $cublas_inc, $wheel_root/lib"

# --- 2. the driver API: the real libcuda.so, or a link stub ---------------------
driver=""
for cand in "$cuda_root"/lib64/stubs/libcuda.so "$cuda_root"/lib/stubs/libcuda.so \
            /usr/lib/x86_64-linux-gnu/libcuda.so /usr/lib64/libcuda.so; do
  if [ -f "$cand" ]; then driver=$cand; break; fi
done
if [ -z "$driver" ]; then
  driver="$tk/lib/stubs/libcuda.so"
  if [ ! -f "$driver" ] || [ "$cuda_root/include/cuda.h" -nt "$driver" ]; then
    echo '#include <cuda.h>' | gcc -E -P -I"$cuda_root/include" -x c - \
      | grep -oE '\bCUresult[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' \
      | sed -E 's/CUresult[[:space:]]+(cu[A-Za-z0-9_]+).*/\1/' | sort -u \
      | awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$tk/lib/stubs/libcuda_stub.c"
    gcc -shared -fPIC -o "$driver" -Wl,-soname,libcuda.so.1 "$tk/lib/stubs/libcuda_stub.c"
    log "no driver here: made a link stub exporting $(grep -c . "$tk/lib/stubs/libcuda_stub.c") driver functions"
  fi
fi

# --- 3. configure ---------------------------------------------------------------
cmake_args=(
  -S "$root" -B "$bdir" -G Ninja
  -DCMAKE_BUILD_TYPE=Release
  -DPYLLAMA_BACKEND=cuda
  -DCMAKE_C_COMPILER="$(command -v gcc)"
  -DCMAKE_CXX_COMPILER="$(command -v g++)"
  -DCMAKE_CUDA_COMPILER="$nvcc"
  -DCMAKE_CUDA_ARCHITECTURES="$arch"
  -DCUDAToolkit_ROOT="$cuda_root"
  -DCUDA_cublas_LIBRARY="$tk/lib/libcublas.so"
  -DCUDA_cublasLt_LIBRARY="$tk/lib/libcublasLt.so"
  -DCUDA_cuda_driver_LIBRARY="$driver"
  -DCMAKE_CUDA_FLAGS="-isystem $cublas_inc"
  -DCMAKE_SHARED_LINKER_FLAGS="-Wl,--no-undefined"
  -DPython_EXECUTABLE="$(command -v "$py")"
)
mkdir -p "$root/build/logs"
cfg_log=$root/build/logs/cuda-configure.log
bld_log=$root/build/logs/cuda-build.log
log "configuring $bdir (log: $cfg_log)"
cmake "${cmake_args[@]}" > "$cfg_log" 2>&1 || { tail -n 40 "$cfg_log" >&2; exit 1; }
grep -E "CUDA Toolkit found|Using CUDA architectures|pyllama:" "$cfg_log" >&2 || true

# --- 4. build -------------------------------------------------------------------
limit=${PYLLAMA_CUDA_TIME_LIMIT:-0}
if [ "$limit" -gt 0 ]; then log "building (log: $bld_log), time limit ${limit}s"; else log "building (log: $bld_log)"; fi
# The clock starts once the lock is held: waiting for another build is not build time.
# (The inner script's $1 and $@ are its own, hence the single quotes.)
start_file=$(mktemp)
trap 'rm -f "$start_file"' EXIT
set +e
if [ "$limit" -gt 0 ]; then
  # shellcheck disable=SC2016
  flock /tmp/pyllama-build.lock bash -c 'date +%s > "$1"; shift; exec "$@"' _ "$start_file" \
    timeout --kill-after=30 "$limit" cmake --build "$bdir" -j "$(nproc)" > "$bld_log" 2>&1
else
  # shellcheck disable=SC2016
  flock /tmp/pyllama-build.lock bash -c 'date +%s > "$1"; shift; exec "$@"' _ "$start_file" \
    cmake --build "$bdir" -j "$(nproc)" > "$bld_log" 2>&1
fi
rc=$?
set -e
secs=$(( $(date +%s) - $(cat "$start_file") ))
progress=$(grep -oE '^\[[0-9]+/[0-9]+\]' "$bld_log" | tail -n1 | tr -d '[]' || true)
done_steps=${progress%/*}
total_steps=${progress#*/}
echo "--- build log tail" >&2
tail -n 15 "$bld_log" >&2
if [ $rc -eq 0 ]; then
  so=$(find "$bdir" -name libggml-cuda.so -type f -newer "$start_file" -print -quit)
  [ -n "$so" ] || so=$(find "$bdir" -name libggml-cuda.so -type f -print -quit)
  log "OK: built and linked in ${secs}s (sm_$arch, nvcc $cuda_ver, cuBLAS $cublas_ver)"
  log "$(stat -c %s "$so") bytes: $so"
  log "needs at run time: $(readelf -d "$so" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
  log "CUDA symbols left to the driver: $(nm -D --undefined-only "$so" | grep -c ' cu[A-Z]')"
  exit 0
fi
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  rate=""
  [ -n "${done_steps:-}" ] && [ "$done_steps" -gt 0 ] && rate=$(awk -v d="$done_steps" -v t="$total_steps" -v s="$secs" \
    'BEGIN { printf "%.1f s/step, about %d min for all %d steps", s/d, s/d*t/60, t }')
  log "STOPPED after ${secs}s at step ${progress:-?} ($rate)"
  exit 124
fi
log "FAILED (exit $rc) after ${secs}s at step ${progress:-?}"
exit $rc
