"""Build llama.cpp's own tools from the vendored tree, with pyllama's flags.

The native side of every comparison: ``llama-bench``, ``llama-batched-bench``,
``llama-simple``, ``ggml-rpc-server`` and the speculative examples (``llama-lookup``,
``llama-speculative-simple``) compiled once from ``vendor/llama.cpp`` with the same CMake
options as the libraries inside pyllama (backend, CPU instruction sets, loadable
backends, shared libraries, Release), into ``build/native/``.

The build is cached: a stamp records the flags and the vendor pin, and a second
call with the same stamp returns at once. Compilation goes through ccache when it
is installed and holds ``/tmp/pyllama-build.lock`` (``flock``) so that it never
runs beside another build on a shared machine.

    python bench/native.py            # build (or confirm the cache), print the tools
    python bench/native.py --flags    # print the CMake flags that would be used
    python bench/native.py --no-lock  # the caller already holds the build lock
                                      # (or set PYLLAMA_BUILD_LOCK_HELD=1, e.g. around a --native run)
    python bench/native.py --server   # also llama-server (bench/serve.py --compare), only when asked

``PYLLAMA_NATIVE_BIN=DIR`` names a directory of tools built elsewhere — pyllama's own
build tree configured with ``-DPYLLAMA_LLAMA_TOOLS=ON`` (tools/gpu_check.sh), where the
tools link the very libraries the wheel carries — and nothing is built then.

``llama-server`` is built into the same tree on request only (its own stamp), with
the web UI off and nothing downloaded (``LLAMA_BUILD_UI=OFF``,
``LLAMA_USE_PREBUILT_UI=OFF``); the tools' stamp and flags are unchanged by it.

From Python: ``native_tool("llama-bench") -> Path``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor" / "llama.cpp"
PIN = ROOT / "vendor" / "llama.cpp.lock"
BUILD_DIR = ROOT / "build" / "native"
STAMP = BUILD_DIR / "pyllama-native.stamp"
LOCK_PATH = Path(os.environ.get("PYLLAMA_BUILD_LOCK", "/tmp/pyllama-build.lock"))

TOOLS = ("llama-bench", "llama-batched-bench", "llama-simple", "ggml-rpc-server", "llama-lookup",
         "llama-speculative-simple", "llama-embedding", "llama-mtmd-cli")
SERVER_TOOL = "llama-server"
SERVER_STAMP = BUILD_DIR / "pyllama-native-server.stamp"
# llama-server without its web UI: nothing is built with npm and nothing is fetched.
_SERVER_FLAGS = ("-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF")

# Bump when the way flags are derived changes, so old stamps stop matching.
_RECIPE = 2

# ggml's x86 instruction-set options, as pyllama's CMakeLists.txt names them in
# build_info.json "cpu_features" (one list decides them all: ON if listed).
CPU_FEATURE_OPTIONS = (
    "SSE42", "AVX", "AVX2", "AVX_VNNI", "BMI2", "FMA", "F16C", "AVX512", "AVX512_VBMI",
    "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8", "AMX_BF16",
)

_BACKEND_OPTIONS = {
    "cpu": [],
    "cpu-all": ["-DGGML_CPU_ALL_VARIANTS=ON"],
    "cuda": ["-DGGML_CUDA=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
    "metal": ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"],
}

# Cache entries of pyllama's own build that are copied verbatim when present.
_COPIED_CACHE_ENTRIES = ("CMAKE_C_COMPILER", "CMAKE_CXX_COMPILER", "CMAKE_CUDA_COMPILER",
                         "CMAKE_CUDA_ARCHITECTURES", "CMAKE_HIP_ARCHITECTURES",
                         "Vulkan_INCLUDE_DIR", "Vulkan_LIBRARY", "Vulkan_GLSLC_EXECUTABLE")


class NativeBuildError(RuntimeError):
    """The native llama.cpp tools could not be configured or built."""


class NativeRunError(RuntimeError):
    """A native llama.cpp tool failed, or never printed its whole output."""


def read_pin() -> dict[str, str]:
    """The vendor pin (``key = "value"`` lines of vendor/llama.cpp.lock)."""
    return dict(re.findall(r'^(\w+)\s*=\s*"([^"]*)"\s*$', PIN.read_text(), flags=re.M))


def _pyllama_build_dirs() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "build").glob("*/build_info.json") if p.parent != BUILD_DIR)


def pyllama_build_info() -> dict[str, Any]:
    """The build flags of the pyllama that is imported (falling back to the checkout's build tree)."""
    try:
        import pyllama

        if hasattr(pyllama, "build_info"):
            return dict(pyllama.build_info())
    except Exception:  # noqa: BLE001 - any import problem: use the other sources
        pass
    try:
        from pyllama._cffi import ffi, lib

        return dict(json.loads(ffi.string(lib.pyllama_build_info()).decode()))
    except Exception:  # noqa: BLE001
        pass
    dirs = _pyllama_build_dirs()
    if not dirs:
        raise NativeBuildError("no pyllama build found (build/*/build_info.json); build pyllama first")
    return dict(json.loads((dirs[-1] / "build_info.json").read_text()))


def _matching_build_dir(info: dict[str, Any]) -> Path | None:
    """The checkout's pyllama build tree that produced ``info`` (same backend and CPU features)."""
    def norm(v: Any) -> list[str]:
        return sorted(str(x) for x in v) if isinstance(v, (list, tuple)) else sorted(
            x for x in re.split(r"[;,\s]+", str(v or "")) if x)

    best: Path | None = None
    for d in _pyllama_build_dirs():
        try:
            other = json.loads((d / "build_info.json").read_text())
        except (OSError, ValueError):
            continue
        if (other.get("backend") == info.get("backend") and other.get("llama_commit") == info.get("llama_commit")
                and norm(other.get("cpu_features")) == norm(info.get("cpu_features"))):
            if best is None or (d / "build_info.json").stat().st_mtime > (best / "build_info.json").stat().st_mtime:
                best = d
    return best


def _pyllama_cmake_cache(info: dict[str, Any]) -> dict[str, str]:
    """Selected entries of the matching pyllama build's CMakeCache.txt (compilers, GPU architectures)."""
    out: dict[str, str] = {}
    d = _matching_build_dir(info)
    cache = d / "CMakeCache.txt" if d else None
    if cache is None or not cache.is_file():
        return out
    for line in cache.read_text(errors="replace").splitlines():
        m = re.match(r"^([A-Za-z0-9_]+):[A-Z]+=(.*)$", line)
        if m and m.group(1) in _COPIED_CACHE_ENTRIES and m.group(2) and not m.group(2).endswith("NOTFOUND"):
            out[m.group(1)] = m.group(2)
    return out


def server_flags(flags: list[str]) -> list[str]:
    """``flags`` with llama-server switched on (and its UI off)."""
    out = [f for f in flags if not f.startswith(("-DLLAMA_BUILD_SERVER=", "-DLLAMA_BUILD_UI=",
                                                  "-DLLAMA_USE_PREBUILT_UI="))]
    return out + list(_SERVER_FLAGS)


def cmake_flags(info: dict[str, Any] | None = None) -> list[str]:
    """The CMake definitions that reproduce pyllama's library build for the standalone tools."""
    info = pyllama_build_info() if info is None else info
    pin = read_pin()
    backend = str(info.get("backend", "cpu")).lower()
    if backend not in _BACKEND_OPTIONS:
        raise NativeBuildError(f"unknown pyllama backend {backend!r} in build_info")
    flags = [
        f"-DCMAKE_BUILD_TYPE={info.get('build_type') or 'Release'}",
        "-DBUILD_SHARED_LIBS=ON",
        "-DGGML_BACKEND_DL=ON",
        # as in pyllama's build: the RPC backend, and rpc-server for `pyllama bench -rpc --native`
        "-DGGML_RPC=ON", "-DGGML_RPC_RDMA=OFF",
        f"-DGGML_NATIVE={'ON' if str(info.get('ggml_native', 'OFF')).upper() == 'ON' else 'OFF'}",
        *_BACKEND_OPTIONS[backend],
        # the tools need llama-common; nothing that fetches or serves
        "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=ON",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_ALL_WARNINGS=OFF",
        # build-info from the pin, not from pyllama's own git repository
        f"-DLLAMA_BUILD_COMMIT={pin['upstream_commit'][:9]}", "-DLLAMA_BUILD_NUMBER=0",
        "-DGGML_CCACHE=OFF",
        # the same GCC AMX workaround as pyllama's build (src/native/gcc_amx_workaround.cmake)
        f"-DCMAKE_PROJECT_INCLUDE={ROOT / 'src' / 'native' / 'gcc_amx_workaround.cmake'}",
        "-DPYLLAMA_AMX_WORKAROUND_DEFER=ON",
    ]
    raw = info.get("cpu_features") or []
    features = [str(f) for f in raw] if isinstance(raw, (list, tuple)) else [f for f in re.split(r"[;,\s]+", str(raw)) if f]
    if features:  # pyllama decided every instruction set explicitly: so do we
        unknown = sorted(set(features) - set(CPU_FEATURE_OPTIONS))
        if unknown:
            raise NativeBuildError(f"unknown CPU feature(s) in build_info: {unknown}")
        flags += [f"-DGGML_{opt}={'ON' if opt in features else 'OFF'}" for opt in CPU_FEATURE_OPTIONS]
    for key, value in sorted(_pyllama_cmake_cache(info).items()):
        flags.append(f"-D{key}={value}")
    ccache = shutil.which("ccache")
    if ccache:
        flags += [f"-DCMAKE_C_COMPILER_LAUNCHER={ccache}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={ccache}"]
        if backend == "cuda":
            flags.append(f"-DCMAKE_CUDA_COMPILER_LAUNCHER={ccache}")
    extra = os.environ.get("PYLLAMA_NATIVE_CMAKE_ARGS", "").split()
    return flags + extra


def _stamp_text(flags: list[str], tools: tuple[str, ...] = TOOLS) -> str:
    pin = read_pin()
    payload = {"recipe": _RECIPE, "pin": pin.get("upstream_commit"), "sha256": pin.get("sha256"),
               "flags": flags, "tools": list(tools)}
    return json.dumps(payload, indent=1, sort_keys=True) + "\n"


def stamp_digest(flags: list[str] | None = None) -> str:
    """A short digest of the flags and pin the tools are (or would be) built with."""
    return hashlib.sha256(_stamp_text(cmake_flags() if flags is None else flags).encode()).hexdigest()[:16]


def bin_dir() -> Path:
    return BUILD_DIR / "bin"


def _exe(name: str) -> Path:
    return bin_dir() / (name + (".exe" if os.name == "nt" else ""))


def _prebuilt(name: str) -> Path | None:
    """The tool in ``PYLLAMA_NATIVE_BIN``, when that names a directory (an error if it lacks the tool)."""
    where = os.environ.get("PYLLAMA_NATIVE_BIN")
    if not where:
        return None
    path = Path(where) / (name + (".exe" if os.name == "nt" else ""))
    if not path.is_file():
        raise NativeBuildError(f"PYLLAMA_NATIVE_BIN={where} has no {path.name}")
    return path


def is_current(flags: list[str] | None = None) -> bool:
    flags = cmake_flags() if flags is None else flags
    return (STAMP.is_file() and STAMP.read_text() == _stamp_text(flags)
            and all(_exe(t).is_file() for t in TOOLS))


@contextlib.contextmanager
def build_lock(enabled: bool = True) -> Iterator[None]:
    """Hold the machine-wide build lock (the same file ``flock(1)`` uses).

    ``PYLLAMA_BUILD_LOCK_HELD=1`` in the environment says an ancestor already holds
    it (``flock /tmp/pyllama-build.lock ...``): taking it again would deadlock.
    """
    if not enabled or os.environ.get("PYLLAMA_BUILD_LOCK_HELD") == "1":
        yield
        return
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"native: waiting for the build lock {LOCK_PATH} ...", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], quiet: bool) -> None:
    print("native: " + " ".join(cmd), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                         text=True)
    if res.returncode != 0:
        tail = (res.stdout or "")[-4000:] if quiet else ""
        raise NativeBuildError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{tail}")


def _backend_targets() -> list[str]:
    cache = BUILD_DIR / "CMakeCache.txt"
    m = re.search(r"^GGML_AVAILABLE_BACKENDS:INTERNAL=(.*)$", cache.read_text(), flags=re.M)
    return [t for t in (m.group(1).split(";") if m else ["ggml-cpu"]) if t]


def build(*, force: bool = False, lock: bool = True, quiet: bool = False, jobs: int | None = None) -> Path:
    """Configure and build the native tools if the stamp does not match; return bin/."""
    if not (VENDOR / "CMakeLists.txt").is_file():
        raise NativeBuildError("vendor/llama.cpp is missing: run `python tools/vendor.py`")
    flags = cmake_flags()
    if not force and is_current(flags):
        return bin_dir()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise NativeBuildError("cmake not found on PATH")
    with build_lock(lock):
        if not force and is_current(flags):  # built by someone else while we waited
            return bin_dir()
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        STAMP.unlink(missing_ok=True)
        gen = ["-G", "Ninja"] if shutil.which("ninja") and not (BUILD_DIR / "Makefile").exists() else []
        _run([cmake, "-S", str(VENDOR), "-B", str(BUILD_DIR), *gen, *flags], quiet)
        targets = [*TOOLS, *_backend_targets()]
        cmd = [cmake, "--build", str(BUILD_DIR), "--config", "Release", "--target", *targets]
        if jobs:
            cmd += ["--parallel", str(jobs)]
        _run(cmd, quiet)
        missing = [t for t in TOOLS if not _exe(t).is_file()]
        if missing:
            raise NativeBuildError(f"build finished but {missing} are missing in {bin_dir()}")
        STAMP.write_text(_stamp_text(flags))
    return bin_dir()


def server_is_current(flags: list[str] | None = None) -> bool:
    sflags = server_flags(cmake_flags() if flags is None else flags)
    return (SERVER_STAMP.is_file() and SERVER_STAMP.read_text() == _stamp_text(sflags, (SERVER_TOOL,))
            and _exe(SERVER_TOOL).is_file())


def build_server(*, force: bool = False, lock: bool = True, quiet: bool = False, jobs: int | None = None) -> Path:
    """Build ``llama-server`` into the same tree (reconfigured with the server on); return its path."""
    if not (VENDOR / "CMakeLists.txt").is_file():
        raise NativeBuildError("vendor/llama.cpp is missing: run `python tools/vendor.py`")
    if not (VENDOR / "tools" / "server" / "CMakeLists.txt").is_file():
        raise NativeBuildError("vendor/llama.cpp/tools/server is missing (an sdist leaves tools/ out)")
    flags = server_flags(cmake_flags())
    if not force and server_is_current():
        return _exe(SERVER_TOOL)
    cmake = shutil.which("cmake")
    if cmake is None:
        raise NativeBuildError("cmake not found on PATH")
    with build_lock(lock):
        if not force and server_is_current():
            return _exe(SERVER_TOOL)
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        SERVER_STAMP.unlink(missing_ok=True)
        gen = ["-G", "Ninja"] if shutil.which("ninja") and not (BUILD_DIR / "Makefile").exists() else []
        _run([cmake, "-S", str(VENDOR), "-B", str(BUILD_DIR), *gen, *flags], quiet)
        cmd = [cmake, "--build", str(BUILD_DIR), "--config", "Release", "--target", SERVER_TOOL,
               *_backend_targets()]
        if jobs:
            cmd += ["--parallel", str(jobs)]
        _run(cmd, quiet)
        if not _exe(SERVER_TOOL).is_file():
            raise NativeBuildError(f"build finished but {SERVER_TOOL} is missing in {bin_dir()}")
        SERVER_STAMP.write_text(_stamp_text(flags, (SERVER_TOOL,)))
    return _exe(SERVER_TOOL)


def server_tool() -> Path:
    """The built ``llama-server`` (never builds: that takes minutes; run ``bench/native.py --server``)."""
    pre = _prebuilt(SERVER_TOOL)
    if pre is not None:
        return pre
    path = _exe(SERVER_TOOL)
    if not path.is_file():
        raise NativeBuildError(f"{path} does not exist; build it with `python bench/native.py --server`")
    if not server_is_current():
        print(f"native: warning: {path} was built from other flags or another pin; rebuild with "
              "`python bench/native.py --server`", file=sys.stderr)
    return path


def native_tool(name: str, *, build_if_needed: bool = True) -> Path:
    """The path of a native llama.cpp tool (``llama-bench``, ...), building the set if needed."""
    if name not in TOOLS:
        raise ValueError(f"unknown native tool {name!r}; expected one of {TOOLS}")
    pre = _prebuilt(name)
    if pre is not None:
        return pre
    if build_if_needed:
        build(quiet=True)
    path = _exe(name)
    if not path.is_file():
        raise NativeBuildError(f"{path} does not exist; run `python bench/native.py`")
    return path


def run_logged(cmd: list[str], complete: Callable[[subprocess.CompletedProcess[str]], bool], *, tries: int = 5,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a llama.cpp program whose output goes through common/log.cpp's asynchronous logger until
    ``complete`` accepts what it printed. That logger is leaked on purpose and its thread never joined
    (llama.cpp #22142: "logs may be lost if not flushed before the program exits"), so now and then a run
    exits before its last lines reach stdout or stderr; such a run is run again (``tries`` times in all)."""
    for _ in range(tries):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise NativeRunError(f"{Path(cmd[0]).name} exited {out.returncode}: {out.stderr[-2000:]}")
        if complete(out):
            return out
    raise NativeRunError(f"{Path(cmd[0]).name} printed an incomplete output {tries} times: {out.stdout[-2000:]!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flags", action="store_true", help="print the CMake flags and exit")
    ap.add_argument("--force", action="store_true", help="reconfigure and rebuild even if the stamp matches")
    ap.add_argument("--no-lock", action="store_true", help="do not take the build lock (the caller holds it)")
    ap.add_argument("-j", "--jobs", type=int, default=None)
    ap.add_argument("--build", action="store_true", help="build (the default action; kept for clarity)")
    ap.add_argument("--server", action="store_true", help="build llama-server only (for bench/serve.py --compare)")
    args = ap.parse_args(argv)
    if args.flags:
        print("\n".join(server_flags(cmake_flags()) if args.server else cmake_flags()))
        return 0
    try:
        if args.server:
            print(build_server(force=args.force, lock=not args.no_lock, jobs=args.jobs))
            return 0
        build(force=args.force, lock=not args.no_lock, jobs=args.jobs)
    except NativeBuildError as exc:
        print(f"native: {exc}", file=sys.stderr)
        return 1
    for t in TOOLS:
        print(_exe(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
