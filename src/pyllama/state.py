"""Saving and restoring a context's state (KV cache, outputs, RNG) to bytes and files.

State is untrusted input: llama.cpp's own format has no checksum, so a flipped
bit in a saved KV cache restores silently as wrong attention data, and
llama.cpp has had memory-safety bugs in restoring state. pyllama therefore
wraps what it saves in a small container: a fixed header naming the model and
context shape it came from, the token history, llama.cpp's bytes, and a CRC32
of everything after the header. Restoring checks size, header, checksum and
shape before llama.cpp reads a byte; any mismatch is a :class:`StateError`.

``load``/``load_seq`` also take llama.cpp's raw bytes and ``load_file``/``load_seq_file``
llama.cpp's own session files (``llama-cli --prompt-cache``, ...): those are
checked for their header, size, model architecture and token count, but a
corrupted KV payload inside them cannot be detected.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from .context_params import ggml_type
from .errors import StateError
from .vocab import TokenArray, as_tokens
from ._context_access import guard, held_record, native

if TYPE_CHECKING:
    from .context import Context

MAGIC = b"PYLLSTAT"
FORMAT_VERSION = 1
KIND_CONTEXT, KIND_SEQUENCE = 0, 1
# magic, version, kind, crc32, n_tokens, payload size, arch, n_params, n_vocab, n_embd, n_layer,
# type_k, type_v, n_seq_max, max_pos, reserved
_HEADER = struct.Struct("<8sIIIIQ32sQIIIiiIiI")

# llama.cpp's formats (llama.h, src/llama-context.cpp)
_SESSION_MAGIC, _SESSION_VERSION = 0x6767736E, 10  # LLAMA_SESSION_MAGIC 'ggsn', LLAMA_SESSION_VERSION
_SEQ_FILE_MAGIC, _SEQ_FILE_VERSION = 0x67677371, 3  # LLAMA_STATE_SEQ_MAGIC 'ggsq', LLAMA_STATE_SEQ_VERSION
_TOKEN_NULL, _SERVER_TOKENS_VERSION = -1, 1  # llama-server's packed slot tokens (tools/server/server-common.cpp)
_SEQ_IO_MAGIC = 0xAF143CD8  # llama-context.cpp io_magic, first word of llama_state_seq_get_data


@dataclass(frozen=True)
class _Shape:
    """What a state depends on: the model and the context's KV layout."""

    arch: bytes
    n_params: int
    n_vocab: int
    n_embd: int
    n_layer: int
    type_k: int
    type_v: int
    n_seq_max: int


def _shape(ctx: Context) -> _Shape:
    m = ctx.model
    return _Shape(m.architecture.encode()[:32], m.n_params, ctx.n_vocab, m.n_embd, m.n_layer,
                  ggml_type(ctx.type_k), ggml_type(ctx.type_v), ctx.n_seq_max)


_FIELDS = {"arch": "model architecture", "n_params": "parameter count", "n_vocab": "vocabulary size",
           "n_embd": "embedding size", "n_layer": "layer count", "type_k": "K cache type",
           "type_v": "V cache type", "n_seq_max": "n_seq_max"}


class State:
    """``ctx.state``: whole-context and per-sequence snapshots (see the module docstring for the format)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    # --- the container ------------------------------------------------------------------
    def _max_pos(self, seq_id: int) -> int:
        seqs = range(self._ctx.n_seq_max) if seq_id < 0 else (seq_id,)
        ranges = [r for r in (self._ctx.kv.pos_range(s) for s in seqs) if r is not None]
        return max((r[1] for r in ranges), default=-1)

    def _pack(self, kind: int, seq_id: int, tokens: TokenArray) -> bytes:
        ctx = self._ctx
        with guard(ctx):
            p = native(ctx)
            if kind == KIND_CONTEXT:
                size = lib.llama_state_get_size(p)
            else:
                size = lib.llama_state_seq_get_size(p, seq_id)
            if size == 0:
                raise StateError("llama.cpp could not size the state (see the 'pyllama.llama' log)")
            head = _HEADER.size + 4 * tokens.size
            buf = bytearray(head + size)
            view = memoryview(buf)
            view[_HEADER.size:head] = tokens.tobytes()
            dst = ffi.from_buffer("uint8_t[]", view[head:])
            if kind == KIND_CONTEXT:
                n = lib.llama_state_get_data(p, dst, size)
            else:
                n = lib.llama_state_seq_get_data(p, dst, size, seq_id)
            max_pos = self._max_pos(-1 if kind == KIND_CONTEXT else seq_id)
        if n == 0:
            raise StateError("llama.cpp could not write the state (see the 'pyllama.llama' log)")
        s = _shape(ctx)
        fields = [MAGIC, FORMAT_VERSION, kind, 0, tokens.size, n, s.arch, s.n_params, s.n_vocab, s.n_embd, s.n_layer,
                  s.type_k, s.type_v, s.n_seq_max, max_pos, 0]
        _HEADER.pack_into(buf, 0, *fields)  # the checksum covers the header (with a zero checksum field) too
        fields[3] = zlib.crc32(view[_HEADER.size:head + n], zlib.crc32(view[:_HEADER.size]))
        _HEADER.pack_into(buf, 0, *fields)
        return bytes(view[: head + n])

    def _unpack(self, data: bytes | bytearray | memoryview, kind: int) -> tuple[TokenArray, memoryview]:
        """Verify a container; returns (tokens, llama.cpp payload)."""
        view = memoryview(data).cast("B")
        if len(view) < _HEADER.size:
            raise StateError(f"state of {len(view)} bytes is truncated (a pyllama state has a {_HEADER.size}-byte header)")
        (magic, version, got_kind, crc, n_tokens, size, arch, n_params, n_vocab, n_embd, n_layer, type_k, type_v,
         n_seq_max, max_pos, _) = _HEADER.unpack_from(view)
        if magic != MAGIC:
            raise StateError("not a pyllama state")
        if version != FORMAT_VERSION:
            raise StateError(f"state format version {version}; this pyllama reads version {FORMAT_VERSION}")
        if got_kind != kind:
            want, have = ("whole-context", "sequence") if kind == KIND_CONTEXT else ("sequence", "whole-context")
            raise StateError(f"this is a {have} state; use the {have} loader, not the {want} one")
        expected = _HEADER.size + 4 * n_tokens + size
        if len(view) != expected:
            raise StateError(f"state is {len(view)} bytes; its header says {expected} (truncated or padded)")
        body = view[_HEADER.size:]
        header = bytearray(view[:_HEADER.size])
        header[16:20] = bytes(4)  # the checksum field, zero while it was computed
        if zlib.crc32(body, zlib.crc32(header)) != crc:
            raise StateError("state checksum mismatch: the data is corrupted")
        saved = _Shape(arch.rstrip(b"\0"), n_params, n_vocab, n_embd, n_layer, type_k, type_v, n_seq_max)
        mine = _shape(self._ctx)
        for name, label in _FIELDS.items():
            a, b = getattr(saved, name), getattr(mine, name)
            if a != b:
                raise StateError(f"state saved with {label} {a!r}; this context has {b!r}")
        limit = self._ctx.n_ctx_seq
        if max_pos >= limit and not self._ctx.model.is_recurrent:
            raise StateError(f"state holds positions up to {max_pos}; this context holds {limit} per sequence")
        tokens = np.frombuffer(body[: 4 * n_tokens], dtype=np.int32).copy()
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= n_vocab):
            raise StateError("state token history holds ids outside the vocabulary")
        return tokens, body[4 * n_tokens:]

    def _check_raw(self, payload: memoryview, kind: int) -> None:
        """What can be checked of llama.cpp's own (unchecksummed) bytes."""
        if kind == KIND_CONTEXT:
            arch = self._ctx.model.architecture.encode()
            if len(payload) < 4 + len(arch) + 4:
                raise StateError(f"state of {len(payload)} bytes is truncated")
            (n,) = struct.unpack_from("<I", payload)
            if n != len(arch) or bytes(payload[4:4 + n]) != arch:
                raise StateError(f"state is not from a {arch.decode()!r} model (or not a state)")
        else:
            if len(payload) < 12:
                raise StateError(f"sequence state of {len(payload)} bytes is truncated")
            (magic,) = struct.unpack_from("<I", payload)
            if magic != _SEQ_IO_MAGIC:
                raise StateError("not a sequence state (wrong magic)")

    def _restore(self, payload: memoryview, kind: int, seq_id: int) -> None:
        self._check_raw(payload, kind)
        ctx = self._ctx
        src = ffi.from_buffer("uint8_t[]", payload)
        with guard(ctx):
            p = native(ctx)
            if kind == KIND_CONTEXT:
                n = lib.llama_state_set_data(p, src, len(payload))
                held_record(ctx).clear()
            else:
                n = lib.llama_state_seq_set_data(p, src, len(payload), seq_id)
                held_record(ctx).forget(seq_id)
        if n == 0:
            what = "state" if kind == KIND_CONTEXT else f"sequence state (into sequence {seq_id})"
            raise StateError(f"llama.cpp could not restore the {what}: different model or context shape, "
                             "or no room in the KV cache (see the 'pyllama.llama' log)")
        if n != len(payload):
            if kind == KIND_CONTEXT:  # nothing half-trusted stays
                ctx.kv.clear()
            else:
                ctx.kv.remove(seq_id)
            raise StateError(f"state has {len(payload) - n} bytes after its end (corrupted or not a state)")

    def _load(self, data: bytes | bytearray | memoryview, kind: int, seq_id: int) -> TokenArray:
        view = memoryview(data).cast("B")
        if bytes(view[:len(MAGIC)]) == MAGIC:
            tokens, payload = self._unpack(view, kind)
        else:
            tokens, payload = np.empty(0, dtype=np.int32), view
        self._restore(payload, kind, seq_id)
        return tokens

    # --- whole context ---------------------------------------------------------------
    def save(self) -> bytes:
        """The whole context state as bytes (pyllama's checksummed container)."""
        return self._pack(KIND_CONTEXT, -1, np.empty(0, dtype=np.int32))

    def load(self, data: bytes | bytearray | memoryview) -> None:
        """Restore a state from :meth:`save` (or llama.cpp's raw ``llama_state_get_data`` bytes).

        Raises StateError, before llama.cpp reads anything, for truncated,
        corrupted or foreign data and for a different model or context shape.
        """
        self._load(data, KIND_CONTEXT, -1)

    def save_file(self, path: str | os.PathLike[str], tokens: npt.ArrayLike = ()) -> None:
        """Write the state, plus the token history ``tokens``, to a file (atomically)."""
        _write(Path(path), self._pack(KIND_CONTEXT, -1, self._tokens(tokens)))

    def load_file(self, path: str | os.PathLike[str]) -> TokenArray:
        """Restore a state file; returns the token history stored with it.

        Reads files from :meth:`save_file` and llama.cpp's session files.
        """
        data = _read(Path(path))
        if data[:len(MAGIC)] != MAGIC:
            return self._load_llama_file(Path(path), data, KIND_CONTEXT, -1)
        return self._load(data, KIND_CONTEXT, -1)

    # --- one sequence ---------------------------------------------------------------
    def save_seq(self, seq_id: int = 0) -> bytes:
        """One sequence's KV state as bytes (pyllama's checksummed container)."""
        seq_id = self._ctx.kv._seq(seq_id)
        return self._pack(KIND_SEQUENCE, seq_id, np.empty(0, dtype=np.int32))

    def load_seq(self, data: bytes | bytearray | memoryview, seq_id: int = 0) -> None:
        """Restore bytes from :meth:`save_seq` into sequence ``seq_id`` (which is replaced)."""
        self._load(data, KIND_SEQUENCE, self._ctx.kv._seq(seq_id))

    def save_seq_file(self, path: str | os.PathLike[str], seq_id: int = 0, tokens: npt.ArrayLike = ()) -> None:
        seq_id = self._ctx.kv._seq(seq_id)
        _write(Path(path), self._pack(KIND_SEQUENCE, seq_id, self._tokens(tokens)))

    def load_seq_file(self, path: str | os.PathLike[str], seq_id: int = 0) -> TokenArray:
        """Restore a sequence file (from :meth:`save_seq_file`, llama.cpp or llama-server's slot save) into
        ``seq_id``; returns its token history. When that history covers exactly the positions restored, the
        context knows the sequence holds it, so a prompt that starts with it reuses it."""
        seq_id = self._ctx.kv._seq(seq_id)
        data = _read(Path(path))
        if data[:len(MAGIC)] != MAGIC:
            tokens = self._load_llama_file(Path(path), data, KIND_SEQUENCE, seq_id)
        else:
            tokens = self._load(data, KIND_SEQUENCE, seq_id)
        if tokens.size and self._ctx.kv.pos_range(seq_id) == (0, tokens.size - 1):
            with guard(self._ctx):
                held_record(self._ctx).set(seq_id, tokens)
        return tokens

    # --- helpers ----------------------------------------------------------------------
    def _tokens(self, tokens: npt.ArrayLike) -> TokenArray:
        toks = as_tokens(tokens)
        self._ctx.model.vocab.check_tokens(toks)
        return toks

    def _load_llama_file(self, path: Path, data: bytes, kind: int, seq_id: int) -> TokenArray:
        """A llama.cpp session/sequence file: check its header and token count, then let llama.cpp read it."""
        magic, version = (_SESSION_MAGIC, _SESSION_VERSION) if kind == KIND_CONTEXT else (_SEQ_FILE_MAGIC, _SEQ_FILE_VERSION)
        if len(data) < 12:
            raise StateError(f"{path}: {len(data)} bytes: not a state file")
        got_magic, got_version, n_tokens = struct.unpack_from("<III", data)
        if got_magic != magic:
            raise StateError(f"{path}: not a pyllama or llama.cpp {'session' if kind == KIND_CONTEXT else 'sequence'} file")
        if got_version != version:
            raise StateError(f"{path}: llama.cpp state file version {got_version}; this build reads {version}")
        ctx = self._ctx
        if n_tokens > ctx.n_ctx:
            raise StateError(f"{path}: holds {n_tokens} tokens; this context holds {ctx.n_ctx}")
        start = 12 + 4 * n_tokens
        if len(data) < start:
            raise StateError(f"{path}: truncated inside its token list")
        toks = np.frombuffer(data, dtype=np.int32, count=n_tokens, offset=12)
        if kind == KIND_SEQUENCE and toks.size and toks[0] == _TOKEN_NULL:
            toks = _server_tokens(path, toks)
        if toks.size and (int(toks.min()) < 0 or int(toks.max()) >= ctx.n_vocab):
            raise StateError(f"{path}: token history holds ids outside the vocabulary")
        # Restored from memory, not by llama_state_load_file: llama.cpp's file reader does not notice a
        # short read (llama-mmap.cpp read_raw_unsafe clamps it to the file size), and a truncated
        # sequence file then aborts on GGML_ASSERT(nread <= state_size) (llama-context.cpp:3370).
        payload = memoryview(data)[start:]
        if kind == KIND_SEQUENCE:  # the in-memory format starts with llama.cpp's io magic and a sequence id
            payload = memoryview(struct.pack("<Ii", _SEQ_IO_MAGIC, seq_id) + bytes(payload))
        self._restore(payload, kind, seq_id)
        out: TokenArray = toks.copy()
        return out


def _server_tokens(path: Path, packed: npt.NDArray[np.int32]) -> TokenArray:
    """The tokens of llama-server's packed slot history (tools/server server_tokens::serialize: a null token,
    a version, the token vector and its media chunks, each vector led by its length)."""
    if packed.size < 4 or int(packed[1]) != _SERVER_TOKENS_VERSION:
        raise StateError(f"{path.name}: a llama-server slot file of an unknown version")
    n = int(packed[2])
    if n < 0 or 3 + n + 1 > packed.size:
        raise StateError(f"{path.name}: a llama-server slot file truncated inside its token list")
    if int(packed[3 + n]) != 0:
        raise StateError(f"{path.name}: the slot holds images or audio, which this build cannot restore")
    if packed.size != 3 + n + 1:
        raise StateError(f"{path.name}: trailing data after the token list of a llama-server slot file")
    return packed[3:3 + n]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StateError(f"could not read state from {path}: {exc.strerror or exc}") from None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StateError(f"could not write state to {path}: {exc.strerror or exc}") from None


__all__ = ["State", "MAGIC", "FORMAT_VERSION"]
