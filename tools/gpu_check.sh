#!/usr/bin/env bash
# shellcheck disable=SC2329  # the phases are functions that run_phase calls by name
# pyllama's own CUDA build on a bare NVIDIA machine, in ONE call of at most ten
# minutes: build, GPU tests, benchmarks against llama.cpp's tools from the same
# CMake tree, serving against llama-server. Everything lands in $OUT.
#
#   tools/gpu_carry.sh                 here, first: wheels + vendor tree into .gpu/
#   tools/gpu_check.sh                 there (the device tool: carry [".gpu"])
#   tools/gpu_check.sh --cpu           the rehearsal: the same phases with the CPU
#                                      backend, small models and counts (tools/gpu_rehearse.sh
#                                      runs it in a clean clone)
#
# Env: OUT (default build/gpu-check), PYLLAMA_GPU_BUDGET (seconds for the whole
# script, default 560: the device tool's call allows 600), PYLLAMA_GPU_PHASE_SCALE (phase budgets times this, default 1),
# PYLLAMA_CUDA_ARCH (default: the GPU's compute capability).
#
# Phases, each with its own time budget and a hard stop (`timeout`); a phase that
# runs out or fails is recorded and the next one still runs where it can, and the
# report is written whatever happens (an EXIT trap):
#   setup   venv over the image's Python (numpy, httpx, pytest, cmake, ninja,
#           scikit-build-core are there) + the carried wheels; the vendor tree
#   build   pyllama's wheel build (scikit-build-core) for this GPU's architecture
#           only, with -DPYLLAMA_LLAMA_TOOLS=ON: llama-bench, llama-simple,
#           llama-batched-bench, llama-server and llama-quantize come out of the
#           same CMake tree (build/gpu-cuda/bin) and link the very libraries pyllama loads. ggml-cuda
#           dominates (its flash-attention template instances above all); the kernel
#           set is llama.cpp's default (GGML_CUDA_FA_ALL_QUANTS off: f16/q4_0/q8_0
#           K/V only), which is what the benchmarks use.
#   models  tests/synth.py: "small" = the starter's shape (Gemma 3 270M: 18 layers,
#           640 wide, 262,144-token vocabulary) and "large" = a 1.1B bandwidth-bound
#           shape (TinyLlama's), both written f16 and quantised to Q4_0 by llama-quantize
#   tests   tests/test_gpu.py (the `gpu` marker) + the binding's fast tests
#   bench   pyllama bench --native (pp512, tg128, fa 0/1, both models, -r 3), end-to-end
#           sampling host/argmax/backend, bench/greedy.py, bench/overhead.py on the device
#   serve   bench/serve.py --compare against llama-server, concurrency 1, 8, 32
#   then, while time lasts: bench/greedy.py, bench/overhead.py, bench/backend_sampling.py
#
# $OUT (8 files at most come back): report.md, log.txt, machine.json, bench.jsonl,
# serve.json, tests.xml, phases.json.
set -uo pipefail
set -a  # every variable reaches the phases, which run in child shells under `timeout`

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
cpu=0
[ "${1:-}" = "--cpu" ] && cpu=1
OUT=${OUT:-$root/build/gpu-check}
mkdir -p "$OUT"
work=${PYLLAMA_GPU_WORK:-/tmp/pyllama-gpu}
mkdir -p "$work"
budget=${PYLLAMA_GPU_BUDGET:-560}
scale=${PYLLAMA_GPU_PHASE_SCALE:-1}  # the rehearsal's 2 cores build and run slower than 16 cores and a GPU
t0=$(date +%s)
deadline=$(( t0 + budget ))
logf=$OUT/log.txt
: > "$logf"
phases=()
log() { echo "gpu_check [$(( $(date +%s) - t0 ))s]: $*" | tee -a "$logf" >&2; }

# run_phase NAME BUDGET CMD...: at most BUDGET seconds, never past the deadline
# less 15 s (for the report).
run_phase() {
  local name=$1 want=$2; shift 2
  want=$(( want * scale ))
  local left=$(( deadline - 15 - $(date +%s) ))
  local lim=$(( want < left ? want : left ))
  if [ "$lim" -lt 5 ]; then
    log "$name: skipped, no time left"; phases+=("{\"phase\":\"$name\",\"status\":\"no time\"}"); return 1
  fi
  log "$name: start (budget ${lim}s)"
  local s; s=$(date +%s)
  # timeout signals its whole process group (compilers, servers); a shell function runs in a child bash
  local out=$work/out-$name.txt
  if declare -F "$1" >/dev/null; then
    export -f "${1?}"
    timeout --kill-after=5 "$lim" bash -c "$*" 2>&1 | tee "$out" >> "$logf"
  else
    timeout --kill-after=5 "$lim" "$@" 2>&1 | tee "$out" >> "$logf"
  fi
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - s ))
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout
  elif [ "$rc" -ne 0 ]; then status="failed rc=$rc"; fi
  log "$name: $status in ${took}s"
  phases+=("{\"phase\":\"$name\",\"status\":\"$status\",\"seconds\":$took,\"budget\":$lim}")
  return "$rc"
}

report() {
  set +e
  printf '[%s]\n' "$(IFS=,; echo "${phases[*]}")" > "$OUT/phases.json"
  {
    echo "# pyllama on $(jq_name) — tools/gpu_check.sh$([ "$cpu" = 1 ] && echo ' --cpu (rehearsal)')"
    echo
    echo "Total $(( $(date +%s) - t0 )) s of a ${budget} s budget."
    echo
    echo "| phase | status | seconds | budget |"
    echo "|---|---|---:|---:|"
    "$vpy" - "$OUT/phases.json" <<'EOF' 2>/dev/null || true
import json, sys
for p in json.load(open(sys.argv[1])):
    print(f"| {p['phase']} | {p['status']} | {p.get('seconds', '')} | {p.get('budget', '')} |")
EOF
    echo
    for f in "$work"/report-*.md; do [ -f "$f" ] && cat "$f" && echo; done
    # what the comparisons printed, as they printed it
    for p in bench-native bench-sampling greedy overhead backend-sampling; do
      [ -s "$work/out-$p.txt" ] || continue
      printf '### %s\n\n```\n' "$p"
      grep -v -e '^WARNING' -e '^ *$' "$work/out-$p.txt" | tail -n 40
      printf '```\n\n'
    done
  } > "$OUT/report.md"
  log "report: $OUT/report.md"
}
jq_name() { sed -n 's/.*"name": *"\([^"]*\)".*/\1/p' "$OUT/machine.json" 2>/dev/null | head -n1 || true; }
vpy=python3
trap report EXIT

# --- the machine ------------------------------------------------------------------
if [ "$cpu" = 0 ]; then
  command -v nvidia-smi >/dev/null || { log "no nvidia-smi: not an NVIDIA machine (use --cpu to rehearse)"; exit 1; }
  IFS=, read -r gname gdriver gmem gcap < <(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
    --format=csv,noheader | head -n1)
  arch=${PYLLAMA_CUDA_ARCH:-$(echo "$gcap" | tr -d ' .')}
  trim() { local v=$1; v=${v#"${v%%[![:space:]]*}"}; printf '%s' "${v%"${v##*[![:space:]]}"}"; }
  nvcc_ver=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  printf '{"name": "%s", "driver": "%s", "memory": "%s", "compute_cap": "%s", "arch": "%s", "nvcc": "%s", "cores": %s}\n' \
    "$(trim "$gname")" "$(trim "$gdriver")" "$(trim "$gmem")" "$(trim "$gcap")" "$arch" "$nvcc_ver" "$(nproc)" > "$OUT/machine.json"
  backend=cuda
else
  printf '{"name": "CPU rehearsal (%s)", "cores": %s}\n' "$(uname -n)" "$(nproc)" > "$OUT/machine.json"
  backend=cpu
fi
log "machine: $(cat "$OUT/machine.json")"
jobs=$(nproc)

# --- setup: a venv over the image's packages, the carried wheels, the vendor tree --
setup() {
  set -e
  rm -rf "$work/venv"
  python3 -m venv --system-site-packages "$work/venv"
  if [ "${PYLLAMA_GPU_IMAGE_PACKAGES:-0}" = 1 ]; then  # the rehearsal: what the GPU image has, from PyPI
    "$work/venv/bin/pip" install -q numpy httpx pytest scikit-build-core cmake ninja filelock pyyaml tqdm \
      typing-extensions requests
  fi
  if ls .gpu/whl/*.whl >/dev/null 2>&1; then
    "$work/venv/bin/pip" install -q --no-index --no-deps --no-compile .gpu/whl/*.whl
  fi
  if [ ! -f vendor/llama.cpp/include/llama.h ]; then
    [ -f .gpu/vendor.tar.xz ] || { echo "no vendor tree and no .gpu/vendor.tar.xz (run tools/gpu_carry.sh here)"; exit 1; }
    tar -C vendor -xJf .gpu/vendor.tar.xz
  fi
  "$work/venv/bin/python" -c "import cffi, gguf, numpy, httpx, pytest, starlette, uvicorn, pydantic, scikit_build_core; print('python deps ok')"
  command -v cmake && command -v ninja
}
run_phase setup 60 setup || exit 1
vpy=$work/venv/bin/python
PATH=$work/venv/bin:$PATH

# --- build ----------------------------------------------------------------------------
bdir=$root/build/gpu-$backend
build() {
  set -e
  local defs=(-C "build-dir=$bdir" -C "cmake.define.PYLLAMA_BACKEND=$backend" -C cmake.define.PYLLAMA_LLAMA_TOOLS=ON)
  [ "$cpu" = 0 ] && defs+=(-C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$arch")
  CMAKE_BUILD_PARALLEL_LEVEL=$jobs "$vpy" -m pip install --no-index --no-deps --no-build-isolation "${defs[@]}" .
  find "$bdir" -maxdepth 3 \( -name 'llama-*' -o -name '*.so' \) -type f | sort
}
s=$(date +%s)
run_phase build 330 build || exit 1
echo "- build: $(( $(date +%s) - s )) s on $jobs cores ($backend$([ "$cpu" = 0 ] && echo ", sm_$arch"))" > "$work/report-build.md"
export PYLLAMA_NATIVE_BIN=$bdir/bin PYLLAMA_NATIVE_BENCH=$bdir/bin/llama-bench  # llama.cpp writes its programs and libraries to bin/

# --- models -----------------------------------------------------------------------------
models=$work/models
mkdir -p "$models"
write_models() {
  set -e
  local small_shape large_shape
  if [ "$cpu" = 0 ]; then
    small_shape=(--n-layer 18 --n-embd 640 --n-head 4 --n-head-kv 1 --n-ff 2048 --n-vocab 262144 --n-ctx-train 8192)
    large_shape=(--n-layer 22 --n-embd 2048 --n-head 32 --n-head-kv 4 --n-ff 5632 --n-vocab 32000 --n-ctx-train 8192)
  else
    small_shape=(--n-layer 4 --n-embd 256 --n-head 4 --n-head-kv 1 --n-ff 512 --n-vocab 32768 --n-ctx-train 4096)
    large_shape=(--n-layer 4 --n-embd 512 --n-head 8 --n-head-kv 2 --n-ff 1408 --n-vocab 32000 --n-ctx-train 4096)
  fi
  "$vpy" tests/synth.py "$models/small-f16.gguf" "${small_shape[@]}" --dtype f16
  "$vpy" tests/synth.py "$models/large-f16.gguf" "${large_shape[@]}" --dtype f16
  for m in small large; do
    "$PYLLAMA_NATIVE_BIN/llama-quantize" "$models/$m-f16.gguf" "$models/$m.gguf" Q4_0 "$jobs" > /dev/null
    rm -f "$models/$m-f16.gguf"
  done
  ls -la "$models"
}
run_phase models 60 write_models || exit 1
small=$models/small.gguf
large=$models/large.gguf

# --- tests --------------------------------------------------------------------------------
tests() {
  local env=()
  [ "$cpu" = 1 ] && env=(PYLLAMA_GPU_TESTS_ON_CPU=1)
  env "${env[@]}" "$vpy" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_binding.py \
    --junitxml="$OUT/tests.xml" -o addopts="" -x
}
run_phase tests 75 tests
"$vpy" - "$OUT/tests.xml" > "$work/report-tests.md" <<'EOF' 2>/dev/null || true
import sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot()
s = s if s.tag == "testsuite" else s[0]
print(f"- tests: {s.get('tests')} run, {s.get('failures')} failed, {s.get('errors')} errors, {s.get('skipped')} skipped")
EOF

# --- bench: llama-bench's matrix through pyllama and llama-bench, interleaved -----------
if [ "$cpu" = 0 ]; then reps=3; pp=512; tg=128; else reps=1; pp=64; tg=16; fi
bench_native() {
  "$vpy" -m pyllama bench --native -m "$small" -m "$large" -p "$pp" -n "$tg" -fa 0,1 -ngl 99 -r "$reps" \
    -o jsonl -oe md > "$OUT/bench.jsonl"  # llama-bench's table (its CUDA scoreboard's columns) on stderr
}
run_phase bench-native 150 bench_native
bench_sampling() {
  "$vpy" -m pyllama bench -m "$small" -p 0 -n "$tg" -ngl 99 -r "$reps" --sampling host,argmax,backend -o md
}
run_phase bench-sampling 45 bench_sampling
# --- serving ----------------------------------------------------------------------------------
if [ "$cpu" = 0 ]; then levels=1,8,32; slots=32; sn=128; else levels=1,2; slots=2; sn=16; fi
run_phase serve 120 "$vpy" bench/serve.py --compare "$small" -c "$levels" --slots "$slots" -n "$sn" --rounds 2 \
  --threads 4 -o "$OUT/serve.json"

if [ "$cpu" = 0 ]; then pairs=5; n=256; rounds=9; reps2=20; else pairs=1; n=16; rounds=3; reps2=3; fi
run_phase greedy 40 "$vpy" bench/greedy.py -m "$small" -n "$n" --pairs "$pairs" -t 4
run_phase overhead 40 "$vpy" bench/overhead.py -m "$small" -ngl all --rounds "$rounds" --reps "$reps2" --threads 4
run_phase backend-sampling 40 "$vpy" bench/backend_sampling.py -m "$small" -n "$n" --rounds 3 -t 4

# The summary tables: pyllama/native per test (bench/render.py) and the serving comparison.
if [ -s "$OUT/bench.jsonl" ]; then
  mkdir -p "$work/render"
  cp "$OUT/bench.jsonl" "$work/render/gpu.jsonl"
  "$vpy" bench/render.py --results "$work/render" --out "$work/render" --no-plots >> "$logf" 2>&1 \
    && cp "$work/render/README.md" "$work/report-bench.md"
fi
{ echo "### serving, pyllama serve / llama-server"; echo
  grep -A200 '^| concurrency | metric' "$work/out-serve.txt" | grep '^|'; } > "$work/report-serve.md" 2>/dev/null || true
status=0
for p in "${phases[@]}"; do case $p in *'"ok"'*) ;; *) status=1 ;; esac; done
exit $status
