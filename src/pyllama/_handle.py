"""Ownership of C handles: freed exactly once, by close() or at garbage collection."""

from __future__ import annotations

import weakref
from typing import Any, Callable

from .errors import ClosedError


def _release(free: Callable[[Any], None], ptr: Any, _keepalive: tuple[Any, ...]) -> None:
    free(ptr)


class Handle:
    """Base for objects that own one C pointer.

    ``close()`` is the main path and is idempotent; the finalizer is the safety
    net for objects dropped without it. ``keepalive`` objects (the parent model
    of a context, say) stay alive until this handle is freed, so a child is
    always freed before its parent.
    """

    _kind = "object"

    def __init__(self, ptr: Any, free: Callable[[Any], None], *keepalive: Any) -> None:
        self._ptr = ptr
        self._finalizer = weakref.finalize(self, _release, free, ptr, keepalive)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _p(self) -> Any:
        ptr = self._ptr
        if ptr is None:
            raise ClosedError(f"this {self._kind} is closed")
        return ptr

    def close(self) -> None:
        """Free the native object now. Safe to call more than once."""
        self._ptr = None
        self._finalizer()

    def __enter__(self) -> Any:
        self._p()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
