"""The worker's exceptions."""

from __future__ import annotations

import signal as _signal
from collections.abc import Sequence

from ..errors import LlamaError


class WorkerError(LlamaError):
    """The worker process could not serve a request (an error without a pyllama class of its own)."""


class WorkerCrashedError(WorkerError):
    """The worker process died; ``exit_code``/``signal`` say how and ``log_tail`` holds its last log lines."""

    def __init__(self, message: str, *, pid: int | None = None, exit_code: int | None = None,
                 signal: int | None = None, log_tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.pid = pid
        self.exit_code = exit_code
        self.signal = signal
        self.log_tail = list(log_tail)

    @classmethod
    def from_exit(cls, pid: int | None, returncode: int | None, log_tail: Sequence[str],
                  doing: str = "") -> WorkerCrashedError:
        """Describe a child that exited with ``returncode`` (negative: killed by that signal)."""
        sig = -returncode if returncode is not None and returncode < 0 else None
        code = returncode if returncode is not None and returncode >= 0 else None
        if sig is not None:
            try:
                name = _signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            how = f"was killed by {name} ({sig})"
        elif code is not None:
            how = f"exited with code {code}"
        else:
            how = "stopped answering"
        msg = f"the pyllama worker process (pid {pid}) {how}{doing}"
        if log_tail:  # the end of it: what llama.cpp said last (all of it stays in ``log_tail``)
            msg += "; its last log lines:\n  " + "\n  ".join(list(log_tail)[-12:])
        return cls(msg, pid=pid, exit_code=code, signal=sig, log_tail=log_tail)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (str(self), self.pid, self.exit_code, self.signal, self.log_tail))


def _rebuild(message: str, pid: int | None, exit_code: int | None, signal: int | None,
             log_tail: list[str]) -> WorkerCrashedError:
    return WorkerCrashedError(message, pid=pid, exit_code=exit_code, signal=signal, log_tail=log_tail)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


class WorkerMemoryError(WorkerCrashedError, MemoryError):
    """The worker process ran out of the memory ``Worker(memory_limit=...)`` gives it: it died of it, or an
    allocation there failed (a model or a context larger than the limit) and it lives on, without
    ``exit_code`` or ``signal``. ``memory_limit`` is the limit in bytes."""

    def __init__(self, message: str, *, memory_limit: int, pid: int | None = None, exit_code: int | None = None,
                 signal: int | None = None, log_tail: Sequence[str] = ()) -> None:
        super().__init__(message, pid=pid, exit_code=exit_code, signal=signal, log_tail=log_tail)
        self.memory_limit = memory_limit

    @classmethod
    def died(cls, pid: int | None, returncode: int | None, log_tail: Sequence[str], memory_limit: int,
             doing: str = "") -> WorkerMemoryError:
        """A child that exited with ``returncode`` after an allocation failed under its limit."""
        crash = WorkerCrashedError.from_exit(pid, returncode, log_tail, doing)
        return cls(f"out of memory under the worker's limit of {_mib(memory_limit)} (Worker(memory_limit="
                   f"{memory_limit})): {crash}", memory_limit=memory_limit, pid=pid, exit_code=crash.exit_code,
                   signal=crash.signal, log_tail=log_tail)

    @classmethod
    def failed(cls, pid: int | None, error: BaseException, log_tail: Sequence[str],
               memory_limit: int) -> WorkerMemoryError:
        """A request the living child failed because an allocation failed under its limit."""
        said = [line for line in log_tail if _says_out_of_memory(line)][-3:]
        why = "; it logged:\n  " + "\n  ".join(said) if said else ""
        return cls(f"out of memory under the worker's limit of {_mib(memory_limit)} (Worker(memory_limit="
                   f"{memory_limit})): {type(error).__name__}: {error}{why}", memory_limit=memory_limit, pid=pid,
                   log_tail=log_tail)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_memory, (str(self), self.memory_limit, self.pid, self.exit_code, self.signal,
                                  self.log_tail))


def _rebuild_memory(message: str, memory_limit: int, pid: int | None, exit_code: int | None, signal: int | None,
                    log_tail: list[str]) -> WorkerMemoryError:
    return WorkerMemoryError(message, memory_limit=memory_limit, pid=pid, exit_code=exit_code, signal=signal,
                             log_tail=log_tail)


# What llama.cpp, ggml, the C++ runtime, the C library, OpenBLAS and Python say when an allocation fails.
_OUT_OF_MEMORY = ("bad_alloc", "cannot allocate memory", "failed to allocate", "unable to allocate",
                  "insufficient memory", "out of memory", "memoryerror", "mmap failed", "memory allocation",
                  "failed to map segment", "cannot map zero-fill")


def _says_out_of_memory(line: str) -> bool:
    low = line.lower()
    return any(sign in low for sign in _OUT_OF_MEMORY)


__all__ = ["WorkerError", "WorkerCrashedError", "WorkerMemoryError"]
