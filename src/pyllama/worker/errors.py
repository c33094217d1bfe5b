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


__all__ = ["WorkerError", "WorkerCrashedError"]
