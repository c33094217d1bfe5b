"""`import pyllama` loads what Model and generate need; the rest of the public names load on first use."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pyllama


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_leaves_heavy_modules_unloaded() -> None:
    heavy = ["asyncio", "ssl", "secrets", "subprocess", "socket", "pyllama.chat", "pyllama.store", "pyllama.worker",
             "pyllama.engine", "pyllama.rpc", "pyllama.parallel", "pyllama.threadpool"]
    loaded = _fresh(f"import sys, pyllama; print([m for m in {heavy!r} if m in sys.modules])")
    assert loaded.strip() == "[]"


def test_every_public_name_resolves_and_is_listed() -> None:
    # in a fresh interpreter, so the lazy names are looked up through pyllama.__getattr__
    missing = _fresh("import pyllama; print([n for n in pyllama.__all__ if getattr(pyllama, n, None) is None])")
    assert missing.strip() == "[]"
    assert set(pyllama.__all__) <= set(dir(pyllama))
    assert len(set(pyllama.__all__)) == len(pyllama.__all__)


def test_lazy_names_are_the_modules_own() -> None:
    from pyllama.engine import Engine, EngineStats
    from pyllama.store import pull
    from pyllama.worker import Worker

    assert pyllama.Engine is Engine and pyllama.EngineStats is EngineStats
    assert pyllama.Worker is Worker and pyllama.pull is pull
    # the submodules that used to load with pyllama are still reachable as attributes
    assert pyllama.store.pull is pull  # type: ignore[attr-defined]
    # the functions stay functions once their modules are loaded (by the engine, say)
    importlib.import_module("pyllama.embed")
    importlib.import_module("pyllama.rerank")
    importlib.import_module("pyllama.generate")
    importlib.import_module("pyllama.devices")
    assert callable(pyllama.embed) and pyllama.embed.__name__ == "embed"
    assert callable(pyllama.rerank) and pyllama.rerank.__name__ == "rerank"
    assert callable(pyllama.generate) and callable(pyllama.devices)


def test_import_loads_neither_numpy_nor_llama_cpp() -> None:
    """`import pyllama` is the errors and the option types; numpy and llama.cpp's libraries load with the
    first model (an app that imports pyllama at start-up, `pyllama --help`, pay nothing for them)."""
    loaded = _fresh("import sys, pyllama; print([m for m in ('numpy', 'pyllama._ffi', 'pyllama._cffi') "
                    "if m in sys.modules])")
    assert loaded.strip() == "[]"
    assert _fresh("import pyllama; print(pyllama.Model.__name__, pyllama.generate.__module__)").split() == [
        "Model", "pyllama.generate"]


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        pyllama.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("pyllama.no_such_name did not raise")
