"""The worker channel: length-prefixed pickle frames over a pipe, message kinds, errors in transit.

One frame is a 4-byte little-endian length and a pickle (protocol 5) of a
tuple whose first item is a message kind. Requests carry a request id so that
calls from several host threads share one channel; replies name the id they
answer. Token events travel as flat tuples (no objects) because they are the
per-token hot path.
"""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import threading
import traceback
from typing import IO, Any

_HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 31  # a sanity bound: a length beyond it means the stream is corrupt

# --- host -> child ---------------------------------------------------------------
LOAD = 1  # (LOAD, rid, spec): store the model spec and load it now
SPEC = 2  # (SPEC, 0, spec): store the spec only (a restarted worker loads on first use)
UNLOAD = 3
TOKENIZE = 4
DETOKENIZE = 5
GENERATE = 6  # streams TOKEN... then END
CHAT = 7  # streams TOKEN... then END
EMBED = 8
TEMPLATE = 9
STATUS = 10
DEBUG = 11  # private crash hooks for tests
CANCEL = 12  # (CANCEL, rid): stop request rid; handled at once by the child's reader thread
SHUTDOWN = 13
INFO = 14
# the serving engine in the child (pyllama.worker.engine.IsolatedEngine; LOAD with "engine_options")
ENGINE_SUBMIT = 15  # (ENGINE_SUBMIT, rid, tokens, options): streams TOKEN... then END or ERR
ENGINE_STATS = 16  # answered by the child's reader thread: (OK, rid, EngineStats | None)
ENGINE_EMBED = 17  # (ENGINE_EMBED, rid, texts, normalize): (OK, rid, vectors), off the main thread
ENGINE_CALL = 18  # (ENGINE_CALL, rid, method, args): (OK, rid, result) of one of ENGINE_METHODS, off the main thread
#: the engine methods ENGINE_CALL runs in the child (a slot action waits for its slot)
ENGINE_METHODS = frozenset({"save_slot", "restore_slot", "erase_slot", "set_lora_scales", "prompt_tokens"})

# --- child -> host ---------------------------------------------------------------
OK = 20  # (OK, rid, value)
ERR = 21  # (ERR, rid, encoded exception)
TOKEN = 22  # (TOKEN, rid, token, text, index, logprob)
END = 23  # (END, rid, finish_reason, n_prompt_tokens, n_prompt_evaluated, SpeculativeStats or None)
PROGRESS = 24  # (PROGRESS, rid, fraction): LOAD's model loading, 0.0..1.0, before its OK or ERR

# --- host-internal (never on the wire) ----------------------------------------------
CRASH = 30  # (CRASH, 0, WorkerCrashedError)


class FrameWriter:
    """Writes whole frames to a file descriptor; safe to share between threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, msg: tuple[Any, ...]) -> None:
        data = pickle.dumps(msg, protocol=5)
        buf = memoryview(_HEADER.pack(len(data)) + data)
        with self._lock:
            while buf:  # a pipe may accept a large frame in parts
                n = os.write(self._fd, buf)
                buf = buf[n:]


def read_frame(stream: IO[bytes]) -> tuple[Any, ...] | None:
    """The next message, or None at end of stream (the other side is gone)."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = _HEADER.unpack(head)
    if n >= MAX_FRAME:
        raise ValueError(f"corrupt worker channel: frame of {n} bytes")
    data = stream.read(n)
    if len(data) < n:
        return None
    msg: tuple[Any, ...] = pickle.loads(data)
    return msg


def encode_error(exc: BaseException) -> tuple[str, str, str, dict[str, Any], str]:
    """An exception as plain data: (module, qualified name, message, picklable attributes, traceback)."""
    cls = type(exc)
    attrs: dict[str, Any] = {}
    for key, value in getattr(exc, "__dict__", {}).items():
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - attributes that cannot travel are left behind
            continue
        attrs[key] = value
    tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    return cls.__module__, cls.__qualname__, str(exc), attrs, tb


def decode_error(data: tuple[str, str, str, dict[str, Any], str], fallback: type[Exception]) -> Exception:
    """Rebuild an exception raised in the child as the same class where that class is
    pyllama's or a builtin; anything else becomes ``fallback`` naming the original."""
    module, qualname, message, attrs, tb = data
    exc: Exception | None = None
    if module == "builtins" or module == "pyllama" or module.startswith("pyllama."):
        try:
            cls: Any = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            if isinstance(cls, type) and issubclass(cls, Exception):
                # Bypass __init__: some pyllama errors take extra arguments (DecodeError's code).
                exc = cls.__new__(cls)
                Exception.__init__(exc, message)
                exc.__dict__.update(attrs)
        except Exception:  # noqa: BLE001 - an unknown class falls back below
            exc = None
    if exc is None:
        exc = fallback(f"{module}.{qualname}: {message}")
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note("raised in the pyllama worker process:\n" + tb.rstrip())
    return exc


__all__ = ["FrameWriter", "read_frame", "encode_error", "decode_error"]
