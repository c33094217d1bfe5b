"""llama.cpp's and ggml's log lines, routed to the ``pyllama`` logger.

Quiet by default: the package logger has a NullHandler, so nothing is printed
unless the application configures logging. llama.cpp emits lines in pieces
(``GGML_LOG_LEVEL_CONT`` continues the previous one); pieces are joined and
each complete line becomes one record on ``pyllama.llama``.
"""

from __future__ import annotations

import atexit
import logging
import threading

from ._cffi import ffi, lib

logger = logging.getLogger("pyllama")
logger.addHandler(logging.NullHandler())
native_logger = logging.getLogger("pyllama.llama")

_LEVELS = {
    lib.GGML_LOG_LEVEL_NONE: logging.INFO,
    lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    lib.GGML_LOG_LEVEL_INFO: logging.INFO,
    lib.GGML_LOG_LEVEL_WARN: logging.WARNING,
    lib.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}

# Pieces of an unfinished line, per native thread (ggml may log from workers).
_pending = threading.local()


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _pyllama_log(level: int, text: object, _user_data: object) -> None:
    # Called from native code: it must never raise back into it.
    try:
        if level == lib.GGML_LOG_LEVEL_CONT:
            py_level = getattr(_pending, "level", logging.INFO)
        else:
            py_level = _LEVELS.get(level, logging.INFO)
            _pending.level = py_level
        if not native_logger.isEnabledFor(py_level):
            _pending.buf = ""
            return
        chunk = ffi.string(text).decode("utf-8", "replace")
        buf = getattr(_pending, "buf", "") + chunk
        *lines, rest = buf.split("\n")
        _pending.buf = rest
        for line in lines:
            if line.strip():
                native_logger.log(py_level, "%s", line)
    except Exception:  # noqa: BLE001 - a logging failure must not cross into C
        pass


def _silence() -> None:
    # After interpreter shutdown starts, a Python callback is no longer safe.
    lib.llama_log_set(lib.pyllama_log_silent, ffi.NULL)
    lib.mtmd_log_set(lib.pyllama_log_silent, ffi.NULL)
    lib.mtmd_helper_log_set(lib.pyllama_log_silent, ffi.NULL)


def install() -> None:
    lib.llama_log_set(lib._pyllama_log, ffi.NULL)
    # libmtmd (images and audio) has loggers of its own, else it prints to stderr
    lib.mtmd_log_set(lib._pyllama_log, ffi.NULL)
    lib.mtmd_helper_log_set(lib._pyllama_log, ffi.NULL)
    atexit.register(_silence)
