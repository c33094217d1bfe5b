#!/usr/bin/env bash
# The rehearsal of tools/gpu_check.sh, by one command, on this CPU machine:
# what the device tool would ship (tracked and untracked-not-ignored files) is
# copied into a fresh directory, tools/gpu_carry.sh gathers .gpu/ there (for
# this machine's python3), and tools/gpu_check.sh --cpu runs every phase with
# the CPU backend, small models and counts, in a fresh venv holding only what
# the GPU image has (PYLLAMA_GPU_IMAGE_PACKAGES=1) plus the carried wheels.
#
#   tools/gpu_rehearse.sh [OUT]        (default OUT: build/gpu-rehearsal)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "${1:-$root/build/gpu-rehearsal}")
dir=$(mktemp -d /tmp/pyllama-gpu-rehearsal.XXXXXX)
[ "${PYLLAMA_GPU_KEEP:-0}" = 1 ] || trap 'rm -rf "$dir"' EXIT  # PYLLAMA_GPU_KEEP=1: leave it to look at
cd "$root"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -C "$dir" -xf -
cd "$dir"
git init -q . && git add -A >/dev/null 2>&1  # gpu_carry sizes the tree with git, as the device tool does
PYLLAMA_GPU_PYTHON=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') \
  bash tools/gpu_carry.sh
rm -rf vendor/llama.cpp  # the GPU machine has only the carried tarball
export CCACHE_BASEDIR=$dir CCACHE_NOHASHDIR=1
OUT=$out PYLLAMA_GPU_IMAGE_PACKAGES=1 PYLLAMA_GPU_WORK=$dir/.work PYLLAMA_GPU_BUDGET=${PYLLAMA_GPU_BUDGET:-2400} \
  PYLLAMA_GPU_PHASE_SCALE=${PYLLAMA_GPU_PHASE_SCALE:-6} \
  bash tools/gpu_check.sh --cpu
