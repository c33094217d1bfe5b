"""Waits with a bound: a test that deadlocks fails with a message instead of hanging the suite."""

from __future__ import annotations

import threading
from typing import Iterable


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
