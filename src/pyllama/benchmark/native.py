"""Running llama.cpp's own ``llama-bench`` for one test, for the interleaved comparison.

The executable is found, in order: ``--native-bin``, ``$PYLLAMA_NATIVE_BENCH``,
then a pyllama checkout's ``bench/native.py`` (which builds it from the vendored
tree with pyllama's flags into ``build/native/``, once). An installed wheel
has no vendored tree: give the path of a llama-bench built from the same
llama.cpp commit (``pyllama.build_info()["llama_commit"]``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from .params import Instance


class NativeBenchError(RuntimeError):
    """The native llama-bench could not be found, built or run."""


def _checkout_roots() -> list[Path]:
    here = Path(__file__).resolve()
    roots = [here.parents[3]]  # src/pyllama/benchmark/native.py -> the checkout (editable installs)
    cwd = Path.cwd().resolve()
    roots += [cwd, *cwd.parents]
    return roots


def find_native_bench(explicit: str | None = None) -> Path:
    """The llama-bench executable to compare against (building it from a checkout if needed)."""
    for cand in (explicit, os.environ.get("PYLLAMA_NATIVE_BENCH")):
        if cand:
            p = Path(cand)
            if p.is_dir():
                p = p / "llama-bench"
            if not p.is_file():
                raise NativeBenchError(f"native llama-bench not found at {p}")
            return p
    for root in _checkout_roots():
        script = root / "bench" / "native.py"
        if script.is_file() and (root / "vendor" / "llama.cpp.lock").is_file():
            spec = importlib.util.spec_from_file_location("_pyllama_bench_native", script)
            if spec is None or spec.loader is None:
                continue
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            try:
                return Path(mod.native_tool("llama-bench"))
            except Exception as exc:  # noqa: BLE001 - reported with its cause
                raise NativeBenchError(f"building the native llama-bench failed: {exc}") from exc
    raise NativeBenchError(
        "no native llama-bench: pass --native-bin PATH (or set PYLLAMA_NATIVE_BENCH), "
        "or run from a pyllama checkout where bench/native.py builds it")


def run_native(exe: Path, inst: Instance, *, reps: int, no_warmup: bool, delay: int = 0,
               verbose: bool = False) -> dict[str, Any]:
    """Run one test with llama-bench (``-o jsonl``) and return its JSON object."""
    cmd = [str(exe), *inst.native_args(), "-r", str(reps), "-o", "jsonl", "--delay", str(delay)]
    if no_warmup:
        cmd.append("--no-warmup")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if verbose and res.stderr:
        print(res.stderr, end="", flush=True)
    if res.returncode != 0:
        raise NativeBenchError(f"llama-bench failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    objs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    if len(objs) != 1:
        raise NativeBenchError(f"expected one record from llama-bench, got {len(objs)}: {' '.join(cmd)}")
    obj: dict[str, Any] = objs[0]
    return obj


__all__ = ["NativeBenchError", "find_native_bench", "run_native"]
