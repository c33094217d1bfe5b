"""Fixtures of the micro-benchmarks: the synthetic model, the starter model, and the native C loop.

Run them with (see bench/README.md)::

    python -m pytest bench/micro --benchmark-only

They are not part of the test suite (``testpaths`` is ``tests``) and assert
nothing about speed: pytest-benchmark's table, and the summary this file
prints at the end, are the result.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # tests/synth.py writes the synthetic models

import synth  # noqa: E402

import pyllama  # noqa: E402

THREADS = 1  # one thread: the least noisy setting, and where per-call overhead shows most

# Filled by the benchmarks, printed by pytest_terminal_summary.
SUMMARY: list[str] = []


@pytest.fixture(scope="session")
def synth_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(synth.write_llama_model(tmp_path_factory.mktemp("synth") / "llama.gguf"))


@pytest.fixture(scope="session")
def synth_model(synth_path: Path) -> Iterator[pyllama.Model]:
    with pyllama.Model(synth_path, n_gpu_layers=0) as m:
        yield m


@pytest.fixture(scope="session")
def starter_path() -> Path:
    try:
        return Path(pyllama.starter_model_path())
    except pyllama.ModelLoadError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def starter_model(starter_path: Path) -> Iterator[pyllama.Model]:
    # No extra buffer types (CPU repack / AMX): these benchmarks time API calls, not matmul
    # kernels, and ggml's AMX kernels die with SIGILL on some virtual machines that
    # advertise AMX (seen on the development VM).
    with pyllama.Model(starter_path, n_gpu_layers=0, use_extra_bufts=False) as m:
        yield m


@pytest.fixture(scope="session")
def starter_as_native(starter_path: Path) -> Iterator[pyllama.Model]:
    """The starter loaded with llama.cpp's defaults (weights repacked for the CPU where the build can), as
    the native programs load it: for the benchmarks that compare whole generations with them."""
    with pyllama.Model(starter_path) as m:
        yield m


def load_bench(name: str) -> Any:
    """A script of bench/ as a module (bench_<name>: no clash with pyllama's own module names)."""
    key = f"bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    sys.path.insert(0, str(ROOT / "bench"))  # the scripts import bench/native.py as ``native``
    spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


def native_tool_or_skip(name: str) -> Path:
    """A llama.cpp program built by bench/native.py from the vendored tree; skips the benchmark without one."""
    try:
        return Path(load_bench("native").native_tool(name))
    except Exception as exc:  # noqa: BLE001 - no native build here: nothing to compare against
        pytest.skip(f"{name} unavailable ({exc}); build it with: python bench/native.py")


def native_tg_us_per_token(model_path: Path, n: int, threads: int) -> float | None:
    """llama-bench's own generation loop (``-p 0 -n N``): µs per token, median of 10 repetitions."""
    try:
        exe = load_bench("native").native_tool("llama-bench")
    except Exception as exc:  # noqa: BLE001 - no native tool: the comparison is left out
        SUMMARY.append(f"native llama-bench unavailable: {exc}")
        return None
    out = subprocess.run([str(exe), "-m", str(model_path), "-p", "0", "-n", str(n), "-r", "10", "-t", str(threads),
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    samples = sorted(json.loads(out)[0]["samples_ns"])
    return float(samples[len(samples) // 2]) / n / 1000


# Set by the generation benchmarks: (model path, tokens per loop, µs per token by loop name).
GENERATION: dict[str, Any] = {}


def _generation_summary() -> None:
    per_token: dict[str, float] = dict(GENERATION.get("per_token", {}))
    if not per_token:
        return
    base = native_tg_us_per_token(GENERATION["model"], GENERATION["n"], THREADS)
    if base is not None:
        per_token["llama-bench C loop"] = base
    SUMMARY.append(f"generation on the synthetic model, {GENERATION['n']} tokens per loop, {THREADS} thread, "
                   "µs per token (median):")
    # pyllama.generate and agenerate run the same sample+decode loop as pyllama_c_generate_loop: their
    # overhead proper is over that loop (bench/overhead.py measures it interleaved)
    sampled = per_token.get("C sample+decode loop")
    for name, us in sorted(per_token.items(), key=lambda kv: kv[1]):
        extra = ""
        if base and name != "llama-bench C loop":
            extra = f"  (+{us - base:.1f} µs over the C loop, x{us / base:.2f}"
            if sampled is not None and name.startswith(("pyllama.generate", "pyllama.agenerate")):
                extra += f"; +{us - sampled:.1f} over the C sample+decode loop"
            extra += ")"
        SUMMARY.append(f"  {name:28s} {us:8.1f}{extra}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    _generation_summary()
    if SUMMARY:
        terminalreporter.section("pyllama micro-benchmark summary")
        for line in SUMMARY:
            terminalreporter.write_line(line)
