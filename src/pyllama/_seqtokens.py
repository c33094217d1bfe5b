"""What each sequence of a context holds: the token ids behind its KV cells, for prefix reuse.

:meth:`pyllama.Context.evaluate` keeps the longest common prefix of what a
sequence holds and the new tokens; this is where it learns what it holds. A
shorter record than the truth is always safe (the next evaluate removes what it
does not know); a longer or different one would reuse the wrong cells, so every
KV edit tells the record, and anything it cannot follow makes it forget.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import numpy.typing as npt


class SeqTokens:
    """Per-sequence token lists in preallocated n_ctx buffers: appending a token is O(1).

    A running fused generation records nothing per token: it registers a ``pending`` function
    (:meth:`follow`) that the tracker calls before anything reads or edits it, so what it reports
    is exact at every point while the token loop does no bookkeeping.
    """

    def __init__(self, n_ctx: int) -> None:
        self._n_ctx = n_ctx
        self._bufs: dict[int, npt.NDArray[np.int32]] = {}
        self._lens: dict[int, int] = {}
        self._live: dict[int, Callable[[], tuple[int, npt.NDArray[np.int32]]]] = {}

    def follow(self, seq_id: int, pending: Callable[[], tuple[int, npt.NDArray[np.int32]]]) -> None:
        """``pending()`` returns the tokens decoded in ``seq_id`` since its last call and the first one's position."""
        self._sync()
        self._live[seq_id] = pending

    def unfollow(self, seq_id: int) -> None:
        self._sync()
        self._live.pop(seq_id, None)

    def _sync(self) -> None:
        for seq_id, pending in self._live.items():
            start, tokens = pending()
            if tokens.size:
                self._extend(seq_id, start, tokens)

    def __bool__(self) -> bool:
        if self._live:
            self._sync()
        return bool(self._lens)

    def get(self, seq_id: int) -> npt.NDArray[np.int32] | None:
        if self._live:
            self._sync()
        n = self._lens.get(seq_id)
        return None if n is None else self._bufs[seq_id][:n]

    def set(self, seq_id: int, tokens: npt.NDArray[np.int32]) -> None:
        if self._live:
            self._sync()
        buf = self._bufs.get(seq_id)
        if buf is None:
            buf = self._bufs[seq_id] = np.empty(self._n_ctx, dtype=np.int32)
        buf[: tokens.size] = tokens
        self._lens[seq_id] = int(tokens.size)

    def append(self, seq_id: int, token: int) -> None:
        if self._live:
            self._sync()
        n = self._lens.get(seq_id)
        if n is not None and n < self._n_ctx:
            self._bufs[seq_id][n] = token
            self._lens[seq_id] = n + 1
        else:
            self._lens.pop(seq_id, None)

    def extend(self, seq_id: int, start: int, tokens: npt.NDArray[np.int32]) -> None:
        """Record ``tokens`` decoded at positions ``start``, ``start + 1``, ... of ``seq_id``."""
        if self._live:
            self._sync()
        self._extend(seq_id, start, tokens)

    def _extend(self, seq_id: int, start: int, tokens: npt.NDArray[np.int32]) -> None:
        # a sequence that no longer holds exactly ``start`` known tokens was changed meanwhile: forget it
        # (a shorter record is always safe: the next evaluate removes what it does not know)
        n = self._lens.get(seq_id)
        if n is None:
            return
        if n != start or start + tokens.size > self._n_ctx:
            self._lens.pop(seq_id, None)
            return
        self._bufs[seq_id][start:start + tokens.size] = tokens
        self._lens[seq_id] = start + int(tokens.size)

    def truncate(self, seq_id: int, n: int) -> None:
        if self._live:
            self._sync()
        if seq_id in self._lens:
            self._lens[seq_id] = min(self._lens[seq_id], max(n, 0))

    def copy(self, src: int, dst: int) -> None:
        toks = self.get(src)
        if toks is None:
            self.forget(dst)
        else:
            self.set(dst, toks.copy())

    def forget(self, seq_id: int) -> None:
        if self._live:
            self._sync()
        self._lens.pop(seq_id, None)

    def clear(self) -> None:
        if self._live:
            self._sync()
        self._lens.clear()


__all__ = ["SeqTokens"]
