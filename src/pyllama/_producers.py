"""Reusable producer threads: the thread that runs an async generation is kept for the next one.

Starting a thread per :func:`pyllama.agenerate` costs its start and join, and a fresh
thread's first tokens run on cold caches (measured on a 2-core VM with the synthetic
model: +7.5 µs per token for a new thread, +3.5 for a reused one, against the
caller's own thread). Threads here run one task at a time, wait for the next
(the most recently idle one is reused first), and end after ``IDLE_S`` seconds
without work; an idle thread holds no reference to what it ran.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable

IDLE_S = 30.0

_lock = threading.Lock()
_idle: list[_Producer] = []


class _Producer:
    __slots__ = ("_tasks", "_thread")

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="pyllama-producer", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        tasks = self._tasks
        while True:
            try:
                task, finished = tasks.get(timeout=IDLE_S)
            except queue.Empty:
                with _lock:
                    if self in _idle:
                        _idle.remove(self)
                        return
                continue  # handed a task as the wait timed out: it is in the queue
            try:
                task()
            except BaseException:  # noqa: S110 - a task reports its own errors; this thread must survive
                pass
            del task  # hold nothing (a context, a generation) while idle
            with _lock:
                _idle.append(self)
            finished.set()
            del finished


def submit(task: Callable[[], None]) -> threading.Event:
    """Run ``task`` on an idle producer thread, or a new one; the event is set once the task has returned
    and the thread is idle again (so that a generation right after reuses it)."""
    finished = threading.Event()
    with _lock:
        worker = _idle.pop() if _idle else None
    if worker is None:
        worker = _Producer()
    worker._tasks.put((task, finished))
    return finished


def _forget_after_fork() -> None:
    # a forked child has none of the parent's threads: handing a task to one would wait forever
    global _lock
    _lock = threading.Lock()
    _idle.clear()


os.register_at_fork(after_in_child=_forget_after_fork)

__all__ = ["submit", "IDLE_S"]
