"""Batch: the tokens of one llama_decode call, built from numpy arrays.

The batch's storage is numpy arrays owned by Python; the ``llama_batch`` struct
handed to llama.cpp points into them, so filling a batch is array assignment,
never a Python loop per token.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib

LogitsSpec = Union[Literal["last", "all", "none"], npt.ArrayLike]


class Batch:
    """Up to ``capacity`` tokens, each in one sequence (``n_seq_max`` ids per token at most).

    Fill it with :meth:`add` (one sequence's tokens at once) or :meth:`set`
    (whole columns), then pass it to :meth:`Context.decode`.
    """

    def __init__(self, capacity: int, *, n_seq_max: int = 1) -> None:
        if capacity < 1 or n_seq_max < 1:
            raise ValueError("a batch needs capacity >= 1 and n_seq_max >= 1")
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id = np.zeros((capacity, n_seq_max), dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        # One pointer per row into seq_id: computed once, vectorised.
        rows = self.seq_id.ctypes.data + np.arange(capacity, dtype=np.uintp) * self.seq_id.strides[0]
        self._rows = rows.astype(np.uintp)
        self._struct = ffi.new("llama_batch *")
        s = self._struct
        s.token = ffi.from_buffer("llama_token[]", self.token)
        s.pos = ffi.from_buffer("llama_pos[]", self.pos)
        s.n_seq_id = ffi.from_buffer("int32_t[]", self.n_seq_id)
        s.seq_id = ffi.cast("llama_seq_id **", self._rows.ctypes.data)
        s.logits = ffi.from_buffer("int8_t[]", self.logits)
        s.embd = ffi.NULL
        s.n_tokens = 0

    @property
    def n_tokens(self) -> int:
        return int(self._struct.n_tokens)

    def __len__(self) -> int:
        return self.n_tokens

    def clear(self) -> Batch:
        self._struct.n_tokens = 0
        return self

    def add(self, tokens: npt.ArrayLike, pos0: int, seq_id: int = 0, *, logits: LogitsSpec = "last") -> Batch:
        """Append one sequence's tokens at positions ``pos0, pos0+1, ...``."""
        toks = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        n, start = toks.size, self.n_tokens
        if start + n > self.capacity:
            raise ValueError(f"batch overflow: {start} + {n} tokens > capacity {self.capacity}")
        mode = _LOGITS_MODES.get(logits) if isinstance(logits, str) else None
        if mode is not None:  # one C call: numpy's slice assignments cost microseconds each when cold
            if n:
                lib.pyllama_batch_add_seq(self._struct, ffi.from_buffer("llama_token[]", toks), n, pos0, seq_id, mode)
            return self
        end = start + n
        self.token[start:end] = toks
        self.pos[start:end] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self.n_seq_id[start:end] = 1
        self.seq_id[start:end, 0] = seq_id
        self.logits[start:end] = _logits_mask(logits, n)
        self._struct.n_tokens = end
        return self

    def set(self, tokens: npt.ArrayLike, pos: npt.ArrayLike, seq_id: npt.ArrayLike = 0,
            logits: LogitsSpec = "last") -> Batch:
        """Replace the contents with whole columns (``seq_id`` a scalar or one id per token)."""
        toks = np.asarray(tokens, dtype=np.int32).reshape(-1)
        n = toks.size
        if n > self.capacity:
            raise ValueError(f"batch overflow: {n} tokens > capacity {self.capacity}")
        self.token[:n] = toks
        self.pos[:n] = np.broadcast_to(np.asarray(pos, dtype=np.int32), (n,))
        self.n_seq_id[:n] = 1
        self.seq_id[:n, 0] = np.broadcast_to(np.asarray(seq_id, dtype=np.int32), (n,))
        self.logits[:n] = _logits_mask(logits, n)
        self._struct.n_tokens = n
        return self

    @classmethod
    def from_tokens(cls, tokens: npt.ArrayLike, pos0: int = 0, seq_id: int = 0, *,
                    logits: LogitsSpec = "last") -> Batch:
        toks = np.asarray(tokens, dtype=np.int32).reshape(-1)
        return cls(max(1, toks.size)).add(toks, pos0, seq_id, logits=logits)

    # --- used by Context -------------------------------------------------------
    def _native(self) -> Any:
        return self._struct[0]

    def _rows_with_logits(self) -> npt.NDArray[np.intp]:
        return np.flatnonzero(self.logits[: self.n_tokens])

    def __repr__(self) -> str:
        return f"<pyllama.Batch {self.n_tokens}/{self.capacity} tokens>"


_LOGITS_MODES = {"none": 0, "last": 1, "all": 2}


def _logits_mask(spec: LogitsSpec, n: int) -> npt.NDArray[np.int8] | int:
    if isinstance(spec, str):
        if spec == "all":
            return 1
        if spec == "none":
            return 0
        if spec == "last":
            mask = np.zeros(n, dtype=np.int8)
            if n:
                mask[-1] = 1
            return mask
        raise ValueError(f"logits must be 'last', 'all', 'none' or a boolean array, not {spec!r}")
    arr = np.asarray(spec).astype(np.int8).reshape(-1)
    if arr.size != n:
        raise ValueError(f"logits mask has {arr.size} entries for {n} tokens")
    return arr


__all__ = ["Batch"]
