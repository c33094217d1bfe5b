"""The one import seam for the compiled binding.

Every module imports ``ffi`` and ``lib`` from here. Importing it checks that the
compiled module belongs to this copy of pyllama, initialises llama.cpp, routes
its logs to :mod:`logging` and loads the ggml backends shipped in the package.
It imports no other pyllama module but ``_version`` and ``_log``: everything else sits above it.
"""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import _version

if sys.platform == "win32":  # pragma: no cover - Windows has no rpath
    import importlib.util

    _spec = importlib.util.find_spec("pyllama._cffi")
    if _spec is not None and _spec.origin:
        _libdir = Path(_spec.origin).parent / "lib"
        if _libdir.is_dir():
            os.add_dll_directory(str(_libdir))
        # CUDA wheels take cudart/cuBLAS from NVIDIA's PyPI wheels (site-packages/nvidia/*/bin).
        for _nv in (Path(_spec.origin).parent.parent / "nvidia").glob("*/bin"):
            os.add_dll_directory(str(_nv))

try:
    from . import _cffi
    from ._cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on a broken install
    raise ImportError(
        "pyllama's compiled binding (pyllama._cffi) could not be loaded: "
        f"{exc}. Reinstall pyllama; from a checkout run `pip install -e .`."
    ) from None

_binding_version = ffi.string(lib.pyllama_binding_version()).decode()
if _binding_version != _version.__version__:
    raise ImportError(
        f"pyllama {_version.__version__} found a compiled binding built for {_binding_version}: "
        "multiple copies of pyllama are installed or the build is stale; reinstall pyllama."
    )

# The libraries sit beside the compiled module (also in editable installs,
# where the Python sources live elsewhere).
LIB_DIR: Path = Path(os.path.abspath(_cffi.__file__)).parent / "lib"


@lru_cache(maxsize=1)
def build_info() -> dict[str, Any]:
    """How the installed binary was built (llama.cpp commit, backend, flags)."""
    info: dict[str, Any] = json.loads(ffi.string(lib.pyllama_build_info()).decode())
    info["backend_libraries"] = info.get("backend_libraries", "").split()
    info["cpu_features"] = [f for f in info.get("cpu_features", "").split(";") if f]
    return info


def _init() -> None:
    from . import _log

    _log.install()  # before anything logs, so nothing reaches stderr directly
    lib.llama_backend_init()
    # Only the package's own lib/ directory: never the working directory. Which shipped accelerator
    # gave no device, and why, pyllama.devices finds out (and logs) when it loads, right after this.
    lib.ggml_backend_load_all_from_path(str(LIB_DIR).encode())


_init()

__all__ = ["ffi", "lib", "LIB_DIR", "build_info"]
