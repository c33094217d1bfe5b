#!/usr/bin/env bash
# AddressSanitizer + UBSan run of the reliability tests: the malformed-model
# corpus, API misuse and untrusted state, with llama.cpp and ggml built
# instrumented.
#
#   bash tools/sanitize.sh [pytest args...]      (env: SANITIZE_JOBS=2, SANITIZE_OPT=-O1)
#   SANITIZE_CPU=0 bash tools/sanitize.sh        (keep the installed, uninstrumented CPU backend: a
#                                                 shorter build that still covers GGUF parsing, loading,
#                                                 vocabulary and state in libllama/libggml-base)
#   SANITIZE_DRY=1 bash tools/sanitize.sh        (no build, no sanitizers: checks the plumbing)
#
# - the vendored llama.cpp (libllama, libggml-base, libggml, libggml-cpu) is
#   built with -fsanitize=address,undefined in build/asan, its own build
#   directory, under `flock /tmp/pyllama-build.lock` (never the editable
#   build's directory); the CPU backend is the portable baseline (no -march),
#   which keeps the build short and avoids compiler workarounds for native ISAs;
# - build/asan/pkg/pyllama overlays the package: the Python sources of
#   src/pyllama (symlinked), the installed binding module (pyllama._cffi, same
#   headers, so the same ABI) and lib/ with the instrumented libraries;
# - build/asan/venv is a pip-less venv whose first .pth puts the overlay ahead
#   of .venv's site-packages, so child processes the tests start use it too;
# - libasan/libubsan are preloaded (Python itself is not instrumented),
#   leaks are not reported (the interpreter keeps memory until exit), and
#   every report goes to build/asan/reports/ (summarised at the end).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bdir=build/asan
jobs=${SANITIZE_JOBS:-2}
opt=${SANITIZE_OPT:--O1}
san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize=vptr -g1 -DNDEBUG $opt"  # NDEBUG: release semantics (no debug assert())
log() { echo "sanitize: $*" >&2; }
export PATH="$root/.venv/bin:$PATH"  # cmake and ninja from the dev venv
dry=${SANITIZE_DRY:-0}
cpu=${SANITIZE_CPU:-1}
targets="llama ggml ggml-base"
if [ "$cpu" = 1 ]; then targets="$targets ggml-cpu"; fi

[ -f vendor/llama.cpp/include/llama.h ] || .venv/bin/python tools/vendor.py
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
binding=$(find "$site/pyllama" -maxdepth 1 -name '_cffi*.so' 2>/dev/null | head -n1)
[ -n "$binding" ] || { log "no installed binding in $site/pyllama: run tools/dev.sh first"; exit 1; }

t0=$(date +%s)
if [ "$dry" != 1 ]; then
log "building llama.cpp with ASan+UBSan in $bdir/llama (waits for the build lock)"
flock /tmp/pyllama-build.lock bash -c "
  set -euo pipefail
  cmake -S vendor/llama.cpp -B '$bdir/llama' -G Ninja -DCMAKE_BUILD_TYPE=None \
    -DCMAKE_C_FLAGS='$san' -DCMAKE_CXX_FLAGS='$san' \
    -DCMAKE_SHARED_LINKER_FLAGS='-fsanitize=address,undefined' -DCMAKE_MODULE_LINKER_FLAGS='-fsanitize=address,undefined' \
    -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >/dev/null
  cmake --build '$bdir/llama' -j '$jobs' --target $targets
"
log "built in $(( $(date +%s) - t0 ))s"
fi

# The overlay package.
pkg=$bdir/pkg/pyllama
rm -rf "$bdir/pkg"
mkdir -p "$pkg/lib"
for f in src/pyllama/*; do ln -s "$root/$f" "$pkg/$(basename "$f")"; done
cp "$binding" "$pkg/"
# The installed libraries first (pyllama-common, the rpc and CPU backends), then the instrumented ones over them.
for f in "$site"/pyllama/lib/*.so; do cp "$f" "$pkg/lib/"; done
if [ "$dry" != 1 ]; then
  for lib in libllama.so libggml.so libggml-base.so; do
    cp "$(find "$bdir/llama" -name "$lib" | head -1)" "$pkg/lib/"
  done
  if [ "$cpu" = 1 ]; then cp "$(find "$bdir/llama" -name libggml-cpu.so | head -1)" "$pkg/lib/"; fi
fi
ls "$pkg/lib"

# A venv whose interpreter sees the overlay first, then .venv's packages.
if [ ! -x "$bdir/venv/bin/python" ]; then
  .venv/bin/python -m venv --without-pip "$bdir/venv"
fi
vsite=$("$bdir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$root/$bdir/pkg" > "$vsite/00-pyllama-asan.pth"
echo "$site" > "$vsite/zz-pyllama-venv.pth"

reports=$bdir/reports
rm -rf "$reports"
mkdir -p "$reports"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$root/$reports/asan:symbolize=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0:log_path=$root/$reports/ubsan"
if [ "$dry" != 1 ]; then
  preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
  export LD_PRELOAD="$preload"
fi
export GGML_NO_BACKTRACE=1
"$bdir/venv/bin/python" -c 'import pyllama, pyllama._ffi as f; print("sanitize: pyllama from", pyllama.__file__, "libs", f.LIB_DIR)'
set +e
"$bdir/venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_malformed.py tests/test_misuse.py tests/test_state_untrusted.py "$@"
rc=$?
set -e
unset LD_PRELOAD
n=$(find "$reports" -mindepth 1 -maxdepth 1 | wc -l)
log "pytest exit status $rc; $n sanitizer report file(s) in $reports"
for f in "$reports"/*; do
  [ -f "$f" ] || continue
  echo "--- $f"; grep -m1 -E "ERROR: AddressSanitizer|runtime error" "$f" || head -3 "$f"
done
log "total $(( $(date +%s) - t0 ))s"
[ "$rc" -eq 0 ] && [ "$n" -eq 0 ]
