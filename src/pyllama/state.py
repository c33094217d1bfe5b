"""Saving and restoring a context's state (KV cache, outputs, RNG) to bytes and files."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from .errors import StateError
from .vocab import TokenArray, as_tokens

if TYPE_CHECKING:
    from .context import Context


class State:
    """``ctx.state``: whole-context and per-sequence snapshots."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    # --- whole context ---------------------------------------------------------------
    def save(self) -> bytes:
        """The whole context state as bytes."""
        ctx = self._ctx
        with ctx._lock:
            p = ctx._p()
            size = lib.llama_state_get_size(p)
            buf = bytearray(size)
            n = lib.llama_state_get_data(p, ffi.from_buffer("uint8_t[]", buf), size)
        if n == 0 and size:
            raise StateError("llama_state_get_data wrote nothing")
        return bytes(memoryview(buf)[:n])

    def load(self, data: bytes) -> None:
        """Restore a state produced by :meth:`save` (from a context of the same model and shape)."""
        ctx = self._ctx
        with ctx._lock:
            n = lib.llama_state_set_data(ctx._p(), ffi.from_buffer("uint8_t[]", data), len(data))
            ctx._seq_tokens.clear()
        if n == 0:
            raise StateError("state could not be restored (different model or context shape?)")

    def save_file(self, path: str | os.PathLike[str], tokens: npt.ArrayLike = ()) -> None:
        """Write the state, plus the token history ``tokens``, to a file."""
        toks = as_tokens(tokens)
        ctx = self._ctx
        with ctx._lock:
            ok = lib.llama_state_save_file(ctx._p(), os.fsencode(path), ffi.from_buffer("llama_token[]", toks), toks.size)
        if not ok:
            raise StateError(f"could not write state to {os.fspath(path)}")

    def load_file(self, path: str | os.PathLike[str]) -> TokenArray:
        """Restore a state file; returns the token history stored with it."""
        ctx = self._ctx
        out = np.empty(ctx.n_ctx, dtype=np.int32)
        n_out = ffi.new("size_t *")
        with ctx._lock:
            ok = lib.llama_state_load_file(ctx._p(), os.fsencode(path), ffi.from_buffer("llama_token[]", out),
                                           out.size, n_out)
            ctx._seq_tokens.clear()
        if not ok:
            raise StateError(f"could not restore state from {os.fspath(path)}")
        return out[: n_out[0]]

    # --- one sequence ---------------------------------------------------------------
    def save_seq(self, seq_id: int = 0) -> bytes:
        """One sequence's KV state as bytes."""
        ctx = self._ctx
        ctx.kv._seq(seq_id)
        with ctx._lock:
            p = ctx._p()
            size = lib.llama_state_seq_get_size(p, seq_id)
            buf = bytearray(size)
            n = lib.llama_state_seq_get_data(p, ffi.from_buffer("uint8_t[]", buf), size, seq_id)
        return bytes(memoryview(buf)[:n])

    def load_seq(self, data: bytes, seq_id: int = 0) -> None:
        """Restore bytes from :meth:`save_seq` into sequence ``seq_id`` (which is replaced)."""
        ctx = self._ctx
        ctx.kv._seq(seq_id)
        with ctx._lock:
            n = lib.llama_state_seq_set_data(ctx._p(), ffi.from_buffer("uint8_t[]", data), len(data), seq_id)
            ctx._seq_tokens.forget(seq_id)
        if n == 0:
            raise StateError(f"sequence state could not be restored into sequence {seq_id} (no room in the KV cache?)")

    def save_seq_file(self, path: str | os.PathLike[str], seq_id: int = 0, tokens: npt.ArrayLike = ()) -> None:
        toks = as_tokens(tokens)
        ctx = self._ctx
        ctx.kv._seq(seq_id)
        with ctx._lock:
            n = lib.llama_state_seq_save_file(ctx._p(), os.fsencode(path), seq_id,
                                              ffi.from_buffer("llama_token[]", toks), toks.size)
        if n == 0:
            raise StateError(f"could not write sequence {seq_id} to {os.fspath(path)}")

    def load_seq_file(self, path: str | os.PathLike[str], seq_id: int = 0) -> TokenArray:
        ctx = self._ctx
        ctx.kv._seq(seq_id)
        out = np.empty(ctx.n_ctx, dtype=np.int32)
        n_out = ffi.new("size_t *")
        with ctx._lock:
            n = lib.llama_state_seq_load_file(ctx._p(), os.fsencode(path), seq_id,
                                              ffi.from_buffer("llama_token[]", out), out.size, n_out)
            ctx._seq_tokens.forget(seq_id)
        if n == 0:
            raise StateError(f"could not restore sequence {seq_id} from {os.fspath(path)}")
        return out[: n_out[0]]


__all__ = ["State"]
