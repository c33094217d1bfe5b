"""The worker's child process: starting it, routing its replies, its stderr tail, its death.

The child is a plain ``python -m pyllama.worker.child`` started with
:class:`subprocess.Popen`, talking over its stdin/stdout pipes (see
:mod:`pyllama.worker.protocol`); its stderr is read line by line so the last
llama.cpp log lines (and anything ``GGML_ASSERT`` prints before aborting) are
at hand when it dies (:class:`WorkerCrashedError`). A reader thread routes each
reply to the :class:`_Inbox` of the request that asked for it, so calls from
several threads share one child. A child with a memory limit that fails to
allocate (dying of it, or failing a request) is reported as
:class:`WorkerMemoryError`.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ClosedError, ContextCreationError, DecodeError, ModelLoadError, StateError
from . import protocol as p
from .errors import WorkerCrashedError, WorkerError, WorkerMemoryError, _says_out_of_memory

logger = logging.getLogger("pyllama.worker")

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
           "CRITICAL": logging.CRITICAL}


class _Inbox:
    """Replies to one request, taken by a blocking thread or awaited from an event loop."""

    __slots__ = ("_event", "_loop", "_q", "_waker", "since")

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.since = 0  # the child's log lines before the request was sent
        self._waker: Callable[[], object] | None = None
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def put(self, msg: tuple[Any, ...]) -> None:  # from the reader thread
        self._q.put(msg)
        waker = self._waker
        if waker is not None:
            try:
                waker()
            except RuntimeError:  # the consumer's loop is closed: nobody awaits this any more
                pass

    def get(self) -> tuple[Any, ...]:
        return self._q.get()

    async def aget(self) -> tuple[Any, ...]:
        try:
            return self._q.get_nowait()
        except queue.Empty:
            pass
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._event is None:
            event = asyncio.Event()
            self._loop, self._event = loop, event
        event = self._event
        event.clear()
        self._waker = lambda: loop.call_soon_threadsafe(event.set)
        try:
            while True:  # a reply that arrived before the waker was set is found here
                try:
                    return self._q.get_nowait()
                except queue.Empty:
                    pass
                await event.wait()
                event.clear()
        finally:
            self._waker = None



# The errors a failed allocation in the child surfaces as (besides MemoryError): only these wait for the
# child's log lines that say whether it was one.
_ALLOCATING = (ModelLoadError, ContextCreationError, StateError, WorkerError)


def limit_memory(pid: int, memory_limit: int) -> None:
    """Cap process ``pid``'s address space (RLIMIT_AS) at ``memory_limit`` bytes, leaving its hard limit."""
    if sys.platform != "linux":
        raise ValueError("memory_limit needs Linux (it sets the child's RLIMIT_AS with prlimit)")
    import resource

    _, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    soft = memory_limit if hard == resource.RLIM_INFINITY else min(memory_limit, hard)
    resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))


class _Process:
    """One child process: its pipes, the reader threads, the requests awaiting replies."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_lines: int, memory_limit: int | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":  # pragma: no cover - Windows only
            # Its own process group (a console Ctrl-C is the host's), and no console window.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | 0x08000000  # CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # the terminal's Ctrl-C and SIGHUP are the host's
        self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=env, close_fds=True, **kwargs)
        self.pid = self.popen.pid
        self.memory_limit = memory_limit
        if memory_limit is not None:
            # Set from here, not in the child: the model loads on a request, after this, and a preexec_fn
            # could deadlock in a host with threads. The child's first imports run under it too.
            try:
                limit_memory(self.pid, memory_limit)
            except ProcessLookupError:  # it died already: the reader reports how
                pass
        assert self.popen.stdin is not None and self.popen.stdout is not None and self.popen.stderr is not None
        self._writer = p.FrameWriter(self.popen.stdin.fileno())
        self._lock = threading.Lock()
        self._pending: dict[int, _Inbox] = {}
        self._next_id = 1
        self.tail: collections.deque[str] = collections.deque(maxlen=max(1, log_lines))
        self.lines = 0  # log lines read so far
        self.crash: WorkerCrashedError | None = None
        self.closing = False
        self._ended = threading.Event()
        # Streams dropped without close() are cancelled from their finalizer, which may run inside
        # any allocation (also while this thread holds a lock here): it only queues the id, and
        # this thread sends the CANCEL.
        self._to_cancel: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._cancel_thread = threading.Thread(target=self._cancel_loop, name=f"pyllama-worker-{self.pid}-cancel",
                                               daemon=True)
        self._stderr_thread = threading.Thread(target=self._read_stderr, name=f"pyllama-worker-{self.pid}-stderr",
                                               daemon=True)
        self._stdout_thread = threading.Thread(target=self._read_stdout, name=f"pyllama-worker-{self.pid}-reader",
                                               daemon=True)
        self._stderr_thread.start()
        self._stdout_thread.start()
        self._cancel_thread.start()

    # --- requests ------------------------------------------------------------------------
    def request(self, kind: int, *args: Any, inbox: _Inbox | None = None) -> tuple[int, _Inbox]:
        """Send a request; its replies arrive in the returned inbox (``inbox`` if given: a subclass may
        handle each reply on the reader thread). Raises the crash if the child is dead."""
        inbox = inbox if inbox is not None else _Inbox()
        inbox.since = self.lines
        with self._lock:
            self._check()
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = inbox
            try:
                # Under the lock: ids reach the child in increasing order (it relies on that).
                self._writer.send((kind, rid, *args))
            except OSError:
                del self._pending[rid]
                broken = True
            except BaseException:  # an argument that cannot be pickled: nothing was sent
                del self._pending[rid]
                raise
            else:
                broken = False
        if broken:  # the child is gone: wait for the reader to say how it died
            self._ended.wait(10)
            with self._lock:
                self._check()
            raise self._crashed(self.popen.poll())
        return rid, inbox

    def post(self, kind: int, *args: Any) -> None:
        """Send a message that gets no reply."""
        with self._lock:
            self._check()
            self._writer.send((kind, 0, *args))

    def _check(self) -> None:
        if self.crash is not None:
            raise copy.copy(self.crash)  # a fresh instance per caller: threads do not share a traceback
        if self.closing:
            raise ClosedError("the worker is closed")

    def done(self, rid: int) -> None:
        self._pending.pop(rid, None)

    def cancel(self, rid: int) -> None:
        """Stop request ``rid`` in the child and drop whatever it still sends."""
        if self._pending.pop(rid, None) is None:
            return
        try:
            with self._lock:
                if self.crash is None and not self.closing:
                    self._writer.send((p.CANCEL, rid))
        except OSError:  # the child is gone: nothing to stop
            pass

    def cancel_later(self, rid: int) -> None:
        """:meth:`cancel` from a finalizer: never blocks, never takes a lock."""
        self._to_cancel.put(rid)

    def _cancel_loop(self) -> None:
        while True:
            rid = self._to_cancel.get()
            if rid is None:
                return
            self.cancel(rid)

    # --- reader threads ----------------------------------------------------------------------
    def _read_stdout(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        pending = self._pending
        try:
            while True:
                msg = p.read_frame(stream)
                if msg is None:
                    break
                inbox = pending.get(msg[1])
                if inbox is not None:  # else: the request was cancelled; drop its leftovers
                    inbox.put(msg)
        except Exception:  # noqa: BLE001 - a corrupt channel counts as a dead worker
            logger.exception("pyllama worker %s: unreadable reply; stopping the worker", self.pid)
        self._ended_child()

    def _read_stderr(self) -> None:
        stream = self.popen.stderr
        assert stream is not None
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            self.lines += 1
            head = line.split(" ", 1)[0]
            logger.log(_LEVELS.get(head, logging.WARNING), "[worker %s] %s", self.pid, line)

    def _ended_child(self) -> None:
        """Our end of the channel closed: the child exited (or is about to). Fail what waits on it."""
        try:
            rc = self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it closed stdout but lives on: stop it
            self.popen.kill()
            rc = self.popen.wait()
        self._stderr_thread.join(timeout=5)  # the lines written just before dying
        with self._lock:
            if self.closing:
                err: Exception = ClosedError("the worker was closed")
            else:
                self.crash = self._crashed(rc)
                err = self.crash
            pending = list(self._pending.values())
            self._pending.clear()
        for inbox in pending:
            inbox.put((p.CRASH, 0, copy.copy(err)))
        self._ended.set()
        if self.crash is not None:
            logger.warning("%s", self.crash)

    # --- out of memory ---------------------------------------------------------------------------
    def _crashed(self, returncode: int | None) -> WorkerCrashedError:
        """How the child died: :class:`WorkerMemoryError` when its last log lines say an allocation failed
        under its memory limit."""
        tail = list(self.tail)
        if self.memory_limit is not None and any(_says_out_of_memory(line) for line in tail[-20:]):
            return WorkerMemoryError.died(self.pid, returncode, tail, self.memory_limit)
        return WorkerCrashedError.from_exit(self.pid, returncode, tail)

    def failure(self, exc: Exception, inbox: _Inbox) -> Exception:
        """The error the child replied to ``inbox``'s request with, as its caller gets it: under a memory
        limit, a MemoryError, or a failure its log lines since the request blame on an allocation, is a
        :class:`WorkerMemoryError` (caused by ``exc``)."""
        if self.memory_limit is None:
            return exc
        def since_request() -> list[str]:
            new = self.lines - inbox.since
            return list(self.tail)[-new:] if new > 0 else []

        recent = since_request()
        out_of_memory = isinstance(exc, MemoryError)
        if not out_of_memory and (isinstance(exc, _ALLOCATING) or type(exc) is DecodeError):
            # The lines were written before the reply, but come on another pipe: give them a moment.
            deadline = time.monotonic() + 0.3
            while not (out_of_memory := any(_says_out_of_memory(line) for line in recent)):
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
                recent = since_request()
        if not out_of_memory:
            return exc
        err = WorkerMemoryError.failed(self.pid, exc, recent, self.memory_limit)
        err.__cause__ = exc
        return err

    # --- shutdown ------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the child to exit, and kill it if it does not within ``timeout`` seconds."""
        with self._lock:
            self.closing = True
            try:
                self._writer.send((p.SHUTDOWN, 0))
            except OSError:
                pass
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        except OSError:
            pass
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._to_cancel.put(None)
        current = threading.current_thread()
        for t in (self._stdout_thread, self._stderr_thread, self._cancel_thread):
            if t is not current:
                t.join(timeout=5)


class _Slot:
    """The worker's current process, shared with its finalizer (which must not hold the worker)."""

    def __init__(self) -> None:
        self.proc: _Process | None = None

    def shutdown(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.shutdown(timeout)
