"""Files named by a request: a name a client gives is held to llama.cpp's file-name rule and must stay,
symlinks followed, inside the directory the server was given for it (``--slot-save-path``); an error
names the client's name, never the server's directories."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .._ffi import lib
from .protocol import APIError


def confined(base: Path, name: object, *, param: str = "filename", allow_subdirs: bool = False) -> Path:
    """The path of ``name`` inside ``base``: 400 for a name llama.cpp's ``fs_validate_filename`` refuses
    (separators unless ``allow_subdirs``, ``..``, control and look-alike characters, over 255 bytes) and
    for one that leads out of ``base`` (an absolute path, or a symlink pointing elsewhere)."""
    if not isinstance(name, str) or not name:
        raise APIError(400, f"{param} must be a non-empty string", param=param, code="invalid_value")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raw = b""
    if not raw or b"\0" in raw or lib.pyllama_validate_filename(raw, allow_subdirs) != 1 or os.path.isabs(name):
        raise APIError(400, f"Invalid {param}: {name[:64]!r}", param=param, code="invalid_value")
    root = base.resolve()
    path = root / name
    if not path.resolve().is_relative_to(root):  # a symlink (the file or a directory on the way) leads out
        raise APIError(400, f"Invalid {param}: {name[:64]!r} leads out of the server's directory", param=param,
                       code="invalid_value")
    return path


_PATH = re.compile(r"(?:[A-Za-z]:)?[/\\](?:[^/\\\s'\"]+[/\\])+([^/\\\s'\"]+)")


def without_dirs(text: str) -> str:
    """``text`` with every file path cut to its file name: an error a client sees never shows where the
    server keeps its files."""
    return _PATH.sub(r"\1", text)


__all__ = ["confined", "without_dirs"]
