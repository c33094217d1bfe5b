"""KV cache (llama.cpp's "memory") of a context: per-sequence position edits."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from typing import TYPE_CHECKING, Any

from ._ffi import lib
from .errors import LlamaError
from ._context_access import guard, held_record, native

if TYPE_CHECKING:
    from .context import Context


class KVCache:
    """``ctx.kv``: edit what each sequence holds. Positions are half-open ranges ``[p0, p1)``;
    ``p1=-1`` means "to the end", ``p0=-1`` "from the start".

    Sequence ids are checked against the context's ``n_seq_max`` before they
    reach llama.cpp (which would assert on them).
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def _mem(self) -> Any:
        return lib.llama_get_memory(native(self._ctx))

    def _seq(self, seq_id: int, *, allow_all: bool = False) -> int:
        seq_id = int(seq_id)
        if allow_all and seq_id == -1:
            return seq_id
        if not 0 <= seq_id < self._ctx.n_seq_max:
            raise ValueError(f"sequence id {seq_id} outside [0, {self._ctx.n_seq_max}) (the context's n_seq_max)")
        return seq_id

    def clear(self, *, data: bool = True) -> None:
        """Empty every sequence (``data=False`` keeps the buffers' contents, only forgetting metadata)."""
        with guard(self._ctx):
            lib.llama_memory_clear(self._mem(), data)
            held_record(self._ctx).clear()

    def remove(self, seq_id: int = -1, p0: int = -1, p1: int = -1) -> None:
        """Remove positions [p0, p1) of a sequence (``seq_id=-1``: every sequence)."""
        seq_id = self._seq(seq_id, allow_all=True)
        with guard(self._ctx):
            if not lib.llama_memory_seq_rm(self._mem(), seq_id, p0, p1):
                raise LlamaError("this model's memory (recurrent) cannot remove a partial range")
            tracker = held_record(self._ctx)
            if seq_id == -1:
                tracker.clear()
            elif p1 < 0:
                tracker.truncate(seq_id, max(p0, 0))
            else:
                tracker.forget(seq_id)

    def copy(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make ``dst`` share positions [p0, p1) of ``src`` (no memory is duplicated)."""
        src, dst = self._seq(src), self._seq(dst)
        with guard(self._ctx):
            lib.llama_memory_seq_cp(self._mem(), src, dst, p0, p1)
            if p0 <= 0 and p1 < 0 and self.pos_range(dst) == self.pos_range(src):
                held_record(self._ctx).copy(src, dst)
            else:
                held_record(self._ctx).forget(dst)

    def keep(self, seq_id: int) -> None:
        """Remove every sequence but ``seq_id``."""
        seq_id = self._seq(seq_id)
        with guard(self._ctx):
            lib.llama_memory_seq_keep(self._mem(), seq_id)
            kept = held_record(self._ctx).get(seq_id)
            held_record(self._ctx).clear()
            if kept is not None:
                held_record(self._ctx).set(seq_id, kept.copy())

    def set_known(self, seq_id: int, tokens: npt.NDArray[np.int32]) -> None:
        """Say which tokens sequence ``seq_id`` holds at positions 0, 1, ... (state restored from a file,
        a cut after an interruption), so the next evaluate reuses them; the caller vouches for it."""
        seq_id = self._seq(seq_id)
        with guard(self._ctx):
            held_record(self._ctx).set(seq_id, np.asarray(tokens, dtype=np.int32))

    @property
    def can_shift(self) -> bool:
        return bool(lib.llama_memory_can_shift(self._mem()))

    def shift(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Add ``delta`` to positions [p0, p1) of a sequence (RoPE is re-applied lazily)."""
        seq_id = self._seq(seq_id, allow_all=True)
        if not self.can_shift:
            raise LlamaError("this model's memory does not support position shifts")
        with guard(self._ctx):
            lib.llama_memory_seq_add(self._mem(), seq_id, p0, p1, delta)
            self._forget(seq_id)

    def divide(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Integer-divide positions [p0, p1) by ``d`` (self-extend style context stretching)."""
        seq_id = self._seq(seq_id, allow_all=True)
        if d < 1:
            raise ValueError("divisor must be >= 1")
        if not self.can_shift:
            raise LlamaError("this model's memory does not support position edits")
        with guard(self._ctx):
            lib.llama_memory_seq_div(self._mem(), seq_id, p0, p1, d)
            self._forget(seq_id)

    def _forget(self, seq_id: int) -> None:
        if seq_id == -1:
            held_record(self._ctx).clear()
        else:
            held_record(self._ctx).forget(seq_id)

    def pos_range(self, seq_id: int = 0) -> tuple[int, int] | None:
        """(smallest, largest) position held by the sequence, or None when it is empty."""
        seq_id = self._seq(seq_id)
        mem = self._mem()
        lo = int(lib.llama_memory_seq_pos_min(mem, seq_id))
        hi = int(lib.llama_memory_seq_pos_max(mem, seq_id))
        return None if hi < 0 else (lo, hi)

    def next_pos(self, seq_id: int = 0) -> int:
        """The position the sequence's next token takes."""
        r = self.pos_range(seq_id)
        return 0 if r is None else r[1] + 1


__all__ = ["KVCache"]
