"""Waits with a bound: a test that deadlocks fails with a message instead of hanging the suite."""

from __future__ import annotations

import threading
from typing import Any, Iterable, Sequence


def join_all(threads: Iterable[threading.Thread], timeout: float = 60.0) -> None:
    """Join every thread, failing if one is still running ``timeout`` seconds after the first join."""
    import time

    deadline = time.monotonic() + timeout
    stuck = []
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            stuck.append(t.name)
    assert not stuck, f"threads still running after {timeout:.0f} s (a deadlock?): {stuck}"


def tokens_on_threads(requests: Sequence[Any], timeout: float = 60.0) -> list[list[int]]:
    """The token ids of each engine request, each consumed on a thread of its own (as concurrent clients
    would), joined with a bound."""
    got: list[list[int]] = [[] for _ in requests]

    def consume(i: int) -> None:
        got[i] = [ev.token for ev in requests[i] if ev.token >= 0]

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    join_all(threads, timeout)
    return got
