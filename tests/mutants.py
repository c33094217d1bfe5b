"""A corpus of malformed GGUF models: deterministic mutants of one small valid model.

Every mutant is a variation of the tiny synthetic llama model of
``tests/synth.py``, made by a minimal GGUF reader/writer of our own (the
``gguf`` package's writer refuses most of what we want to write) and by
byte-level patches at the offsets the writer records. The families follow
issue 11: truncation at every section boundary and ±1, header counts,
key/string/array lengths, value and element types, tensor infos, alignment,
tokenizer arrays and hyper-parameters. ``random_mutants`` adds seeded bit
flips and byte overwrites for longer runs.

The same arguments always give byte-identical files, so a failure seen once
is reproducible anywhere::

    python tests/mutants.py OUT_DIR                 # the deterministic corpus
    python tests/mutants.py OUT_DIR --random 1000 --seed 7
"""

from __future__ import annotations

import argparse
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import synth

# GGUF value types (gguf.h enum gguf_type).
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}
U64_MAX = 2**64 - 1
I64_MAX = 2**63 - 1

# The base model: small enough that hundreds of loads take seconds, big enough to have every section.
BASE_PARAMS = dict(n_layer=1, n_embd=32, n_head=4, n_head_kv=2, n_ff=64, n_ctx_train=128, seed=1234)
ARCH = "llama"


@dataclass
class KV:
    """One key/value pair; arrays hold ``(element_type, [values])``."""

    key: bytes
    vtype: int
    value: Any


@dataclass
class TensorInfo:
    name: bytes
    ne: list[int]
    ggml_type: int
    offset: int


@dataclass
class Gguf:
    """A parsed GGUF file: everything needed to write it back byte-identically."""

    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    data: bytes  # the tensor data section (from the first aligned byte after the infos)
    alignment: int = 32
    n_kv_override: int | None = None  # header counts written instead of the real ones
    n_tensors_override: int | None = None
    magic: bytes = b"GGUF"

    def kv(self, key: str) -> KV:
        for kv in self.kvs:
            if kv.key == key.encode():
                return kv
        raise KeyError(key)

    def index(self, key: str) -> int:
        return [kv.key for kv in self.kvs].index(key.encode())


# --- reading ------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> bytes:
        n = self.take("<Q")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == STR:
            return self.string()
        if vtype == ARR:
            etype, n = self.take("<I"), self.take("<Q")
            return etype, [self.value(etype) for _ in range(n)]
        return self.take(_SCALAR[vtype])


def parse(buf: bytes) -> Gguf:
    r = _Reader(buf)
    magic = buf[:4]
    r.pos = 4
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    kvs = []
    for _ in range(n_kv):
        key = r.string()
        vtype = r.take("<I")
        kvs.append(KV(key, vtype, r.value(vtype)))
    alignment = next((kv.value for kv in kvs if kv.key == b"general.alignment"), 32)
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("<I")
        ne = [r.take("<q") for _ in range(n_dims)]
        tensors.append(TensorInfo(name, ne, r.take("<I"), r.take("<Q")))
    start = -(-r.pos // alignment) * alignment
    return Gguf(version, kvs, tensors, buf[start:], alignment, magic=magic)


# --- writing ------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Offsets of every section boundary of a written file (label -> offset)."""

    marks: list[tuple[str, int]] = field(default_factory=list)

    def mark(self, label: str, offset: int) -> None:
        self.marks.append((label, offset))


def _value_bytes(vtype: int, value: Any) -> bytes:
    if vtype == STR:
        return struct.pack("<Q", len(value)) + value
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value_bytes(etype, v) for v in items)
    return struct.pack(_SCALAR[vtype], value)


def serialize(g: Gguf, layout: Layout | None = None) -> bytes:
    lay = layout if layout is not None else Layout()
    out = bytearray(g.magic)
    lay.mark("version", len(out))
    out += struct.pack("<I", g.version)
    lay.mark("n_tensors", len(out))
    out += struct.pack("<Q", len(g.tensors) if g.n_tensors_override is None else g.n_tensors_override)
    lay.mark("n_kv", len(out))
    out += struct.pack("<Q", len(g.kvs) if g.n_kv_override is None else g.n_kv_override)
    for kv in g.kvs:
        name = kv.key.decode("utf-8", "replace")
        lay.mark(f"kv:{name}", len(out))
        out += struct.pack("<Q", len(kv.key)) + kv.key
        lay.mark(f"kv-type:{name}", len(out))
        out += struct.pack("<I", kv.vtype)
        lay.mark(f"kv-value:{name}", len(out))
        out += _value_bytes(kv.vtype, kv.value)
    for t in g.tensors:
        name = t.name.decode("utf-8", "replace")
        lay.mark(f"ti:{name}", len(out))
        out += struct.pack("<Q", len(t.name)) + t.name
        lay.mark(f"ti-dims:{name}", len(out))
        out += struct.pack("<I", len(t.ne)) + b"".join(struct.pack("<q", n) for n in t.ne)
        lay.mark(f"ti-type:{name}", len(out))
        out += struct.pack("<IQ", t.ggml_type, t.offset)
    lay.mark("padding", len(out))
    align = g.alignment if g.alignment > 0 and g.alignment < 1 << 20 else 32
    out += b"\0" * (-len(out) % align)
    base = len(out)
    lay.mark("data", base)
    for t in sorted(g.tensors, key=lambda t: t.offset):
        if t.offset < len(g.data):
            lay.mark(f"tensor-data:{t.name.decode('utf-8', 'replace')}", base + t.offset)
    out += g.data
    lay.mark("end", len(out))
    return bytes(out)


# --- the base model -----------------------------------------------------------------------------
def base_model(directory: Path) -> tuple[Path, Gguf]:
    """Write the valid base model into ``directory`` and return it parsed."""
    path = synth.write_llama_model(directory / "base.gguf", **BASE_PARAMS)  # type: ignore[arg-type]
    g = parse(path.read_bytes())
    if serialize(g) != path.read_bytes():
        raise RuntimeError("mutants.py cannot round-trip the base model; the GGUF layout changed")
    return path, g


def _copy(g: Gguf) -> Gguf:
    return replace(g, kvs=[replace(kv) for kv in g.kvs], tensors=[replace(t, ne=list(t.ne)) for t in g.tensors])


def _set(g: Gguf, key: str, vtype: int, value: Any) -> Gguf:
    m = _copy(g)
    try:
        kv = m.kv(key)
        kv.vtype, kv.value = vtype, value
    except KeyError:
        m.kvs.append(KV(key.encode(), vtype, value))
    return m


def _drop(g: Gguf, key: str) -> Gguf:
    m = _copy(g)
    m.kvs = [kv for kv in m.kvs if kv.key != key.encode()]
    return m


def _tokens(g: Gguf) -> list[bytes]:
    return list(g.kv("tokenizer.ggml.tokens").value[1])


def _with_tokens(g: Gguf, tokens: list[bytes]) -> Gguf:
    return _set(g, "tokenizer.ggml.tokens", ARR, (STR, tokens))


def _patch(buf: bytes, offset: int, data: bytes) -> bytes:
    return buf[:offset] + data + buf[offset + len(data):]


# --- the deterministic corpus -------------------------------------------------------------------
Mutant = tuple[str, bytes]


def _structural(g: Gguf) -> Iterator[Mutant]:
    """Truncations and header-level byte patches of the serialised base model."""
    lay = Layout()
    buf = serialize(g, lay)
    marks = dict(lay.marks)
    cuts: dict[int, str] = {}
    for label, off in lay.marks:
        for d in (-1, 0, 1):
            if 0 < off + d < len(buf):
                cuts.setdefault(off + d, f"{label}{d:+d}" if d else label)
    for off in (1, 2, 3, 5, 9, 17):
        cuts.setdefault(off, f"header+{off}")
    for off, label in sorted(cuts.items()):
        yield f"truncate@{off}:{label}", buf[:off]
    yield "empty-file", b""

    yield "magic-bad", b"GGUX" + buf[4:]
    yield "magic-lowercase", b"gguf" + buf[4:]
    for v in (0, 1, 2, 4, 0xFFFFFFFF):
        yield f"version={v}", _patch(buf, marks["version"], struct.pack("<I", v))
    n_t, n_kv = len(g.tensors), len(g.kvs)
    for v in (0, n_t - 1, n_t + 1, I64_MAX, 2**63, U64_MAX):
        yield f"n_tensors={v}", _patch(buf, marks["n_tensors"], struct.pack("<Q", v))
    for v in (0, n_kv - 1, n_kv + 1, I64_MAX, 2**63, U64_MAX):
        yield f"n_kv={v}", _patch(buf, marks["n_kv"], struct.pack("<Q", v))

    # Key, string and array lengths patched in place (the bytes after them are left as they are).
    size = len(buf)
    first = f"kv:{g.kvs[0].key.decode()}"
    for v in (0, 2**40, size, U64_MAX):
        yield f"key-len[0]={v}", _patch(buf, marks[first], struct.pack("<Q", v))
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.chat_template"):
        for v in (0, 2**40, size, U64_MAX):
            yield f"str-len:{key}={v}", _patch(buf, marks[f"kv-value:{key}"], struct.pack("<Q", v))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        n_off = marks[f"kv-value:{key}"] + 4
        for v in (0, 1, 2**40, 2**62, size, U64_MAX):
            yield f"arr-len:{key}={v}", _patch(buf, n_off, struct.pack("<Q", v))
    tok0 = marks["kv-value:tokenizer.ggml.tokens"] + 12  # the first element's length
    for v in (2**40, size, U64_MAX):
        yield f"token[0]-len={v}", _patch(buf, tok0, struct.pack("<Q", v))

    # Value and element types out of range, on a scalar, a string and an array.
    for key in ("llama.block_count", "general.architecture", "tokenizer.ggml.tokens"):
        for v in (13, 255, 0xFFFFFFFF):
            yield f"kv-type:{key}={v}", _patch(buf, marks[f"kv-type:{key}"], struct.pack("<I", v))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
        for v in (13, 255, ARR, 0xFFFFFFFF):
            yield f"elem-type:{key}={v}", _patch(buf, marks[f"kv-value:{key}"], struct.pack("<I", v))

    # Tensor infos patched in place.
    t0 = g.tensors[0].name.decode()
    for v in (0, 65, 2**40, U64_MAX):
        yield f"ti-name-len={v}", _patch(buf, marks[f"ti:{t0}"], struct.pack("<Q", v))
    for v in (0, 5, 2**32 - 1):
        yield f"ti-n_dims={v}", _patch(buf, marks[f"ti-dims:{t0}"], struct.pack("<I", v))
    for v in (255, 0xFFFFFFFF):
        yield f"ti-type={v}", _patch(buf, marks[f"ti-type:{t0}"], struct.pack("<I", v))


def _tensor_mutants(g: Gguf) -> Iterator[tuple[str, Gguf]]:
    """Tensor-info mutants rewritten through the writer (so the rest of the file stays consistent)."""
    def each(name: str, fn: Callable[[list[TensorInfo]], None]) -> tuple[str, Gguf]:
        m = _copy(g)
        fn(m.tensors)
        return name, m

    def setter(i: int, **kw: Any) -> Callable[[list[TensorInfo]], None]:
        def fn(ts: list[TensorInfo]) -> None:
            for k, v in kw.items():
                setattr(ts[i], k, v)
        return fn

    emb = 0  # token_embd.weight, 2-D
    norm = next(i for i, t in enumerate(g.tensors) if t.name.endswith(b"attn_norm.weight"))
    last = len(g.tensors) - 1
    ne0 = g.tensors[emb].ne
    yield each("tensor:name-empty", setter(norm, name=b""))
    yield each("tensor:name-64-bytes", setter(norm, name=b"x" * 64))
    yield each("tensor:name-invalid-utf8", setter(norm, name=b"blk.0.\xff\xfe"))
    yield each("tensor:n_dims=0", setter(norm, ne=[]))
    yield each("tensor:n_dims=5", setter(emb, ne=ne0 + [1, 1, 1]))
    yield each("tensor:ne0=0", setter(emb, ne=[0, ne0[1]]))
    yield each("tensor:ne1=0", setter(emb, ne=[ne0[0], 0]))
    yield each("tensor:ne=-1", setter(emb, ne=[-1, ne0[1]]))
    yield each("tensor:ne=i64min", setter(emb, ne=[-(2**63), ne0[1]]))
    yield each("tensor:ne=2^62", setter(emb, ne=[2**62, ne0[1]]))
    yield each("tensor:ne-product-wraps", setter(emb, ne=[2**32, 2**32]))
    yield each("tensor:ne-product-2^63", setter(emb, ne=[2**31, 2**32]))
    yield each("tensor:ne-4d-overflow", setter(norm, ne=[2**16, 2**16, 2**16, 2**16]))
    yield each("tensor:shape-swapped", setter(emb, ne=[ne0[1], ne0[0]]))
    yield each("tensor:shape-wrong", setter(norm, ne=[g.tensors[norm].ne[0] * 2]))
    for t in (4, 5, 36, 39, 40, 255, 2**31):  # removed (Q4_2, Q4_3, ...) and unknown types
        yield each(f"tensor:type={t}", setter(norm, ggml_type=t))
    yield each("tensor:type=q8_0-over-f32-data", setter(norm, ggml_type=8))  # sizes no longer match the data
    yield each("tensor:offset-past-end", setter(last, offset=len(g.data) + 4096))
    yield each("tensor:offset-2^63", setter(last, offset=2**63))
    yield each("tensor:offset-u64max", setter(last, offset=U64_MAX))
    yield each("tensor:offset-misaligned", setter(norm, offset=g.tensors[norm].offset + 1))
    yield each("tensor:offset-overlap", setter(norm, offset=g.tensors[emb].offset))
    yield each("tensor:offset-end-minus-1", setter(last, offset=len(g.data) - 32))

    def dup(ts: list[TensorInfo]) -> None:
        ts[norm + 1].name = ts[norm].name
    yield each("tensor:duplicate-name", dup)

    def missing(ts: list[TensorInfo]) -> None:
        del ts[norm]
    yield each("tensor:missing-attn-norm", missing)

    def missing_out(ts: list[TensorInfo]) -> None:
        del ts[last]
    yield each("tensor:missing-output", missing_out)

    def extra(ts: list[TensorInfo]) -> None:
        ts.append(replace(ts[norm], name=b"blk.7.attn_norm.weight"))
    yield each("tensor:extra-unknown", extra)

    m = _copy(g)
    m.data = m.data[: len(m.data) // 2]
    yield "tensor:data-half", m
    m = _copy(g)
    m.data = b""
    yield "tensor:data-none", m


def _kv_mutants(g: Gguf) -> Iterator[tuple[str, Gguf]]:
    """Metadata mutants: alignment, types, tokenizer arrays and hyper-parameters."""
    a = ARCH
    # Alignment: 0 and non-powers of two are refused by gguf; a huge one by the loader.
    for v in (0, 1, 3, 16, 48, 2**31):
        m = _set(g, "general.alignment", U32, v)
        if v and v < 1 << 20:
            m.alignment = v
        yield f"alignment={v}", m
    yield "alignment-as-string", _set(g, "general.alignment", STR, b"32")
    yield "alignment-as-u64", _set(g, "general.alignment", U64, 32)

    # Keys: duplicates, empty, invalid UTF-8, architecture.
    m = _copy(g)
    m.kvs.append(replace(m.kv(f"{a}.block_count")))
    yield "key-duplicate", m
    yield "key-empty", _set(g, "", U32, 1)
    yield "key-invalid-utf8", _copy_with_raw_key(g, b"general.\xff\xfe")
    yield "arch-missing", _drop(g, "general.architecture")
    yield "arch-unknown", _set(g, "general.architecture", STR, b"nonesuch")
    yield "arch-empty", _set(g, "general.architecture", STR, b"")
    yield "arch-as-int", _set(g, "general.architecture", U32, 7)
    yield "arch-as-array", _set(g, "general.architecture", ARR, (STR, [b"llama"]))
    yield "arch-invalid-utf8", _set(g, "general.architecture", STR, b"lla\xffma")
    yield "nested-array", _set(g, "general.tags", ARR, (ARR, [(U8, [1, 2]), (U8, [3])]))
    yield "array-of-bool-2", _set(g, "general.flags", ARR, (BOOL, [True, False]))
    yield "name-huge", _set(g, "general.name", STR, b"n" * 70000)

    # Hyper-parameters.
    for v in (0, 3, 513, 2**31, 2**32 - 1):
        yield f"block_count={v}", _set(g, f"{a}.block_count", U32, v)
    yield "block_count-as-string", _set(g, f"{a}.block_count", STR, b"1")
    yield "block_count-as-f32", _set(g, f"{a}.block_count", F32, 1.0)
    yield "block_count-as-i32-neg", _set(g, f"{a}.block_count", I32, -1)
    yield "block_count-as-array", _set(g, f"{a}.block_count", ARR, (U32, [1]))
    yield "block_count-missing", _drop(g, f"{a}.block_count")
    for v in (0, 3, 5, 64, 2**31):
        yield f"head_count={v}", _set(g, f"{a}.attention.head_count", U32, v)
    yield "head_count-array-short", _set(g, f"{a}.attention.head_count", ARR, (U32, []))
    yield "head_count-array-long", _set(g, f"{a}.attention.head_count", ARR, (U32, [4] * 600))
    yield "head_count-array-zero", _set(g, f"{a}.attention.head_count", ARR, (U32, [0]))
    yield "head_count-as-string", _set(g, f"{a}.attention.head_count", STR, b"4")
    for v in (0, 3, 8, 2**31):
        yield f"head_count_kv={v}", _set(g, f"{a}.attention.head_count_kv", U32, v)
    for v in (0, 16, 2**31):
        yield f"embedding_length={v}", _set(g, f"{a}.embedding_length", U32, v)
    yield "embedding_length-missing", _drop(g, f"{a}.embedding_length")
    for v in (0, 2**31, 2**32 - 1):
        yield f"context_length={v}", _set(g, f"{a}.context_length", U32, v)
    for v in (0, 2**32 - 1):
        yield f"feed_forward_length={v}", _set(g, f"{a}.feed_forward_length", U32, v)
    for v in (0, 3, 7, 1024):
        yield f"rope.dimension_count={v}", _set(g, f"{a}.rope.dimension_count", U32, v)
    for v in (0.0, -1.0, float("nan"), float("inf")):
        yield f"rms_eps={v}", _set(g, f"{a}.attention.layer_norm_rms_epsilon", F32, v)
        yield f"rope.freq_base={v}", _set(g, f"{a}.rope.freq_base", F32, v)
    yield "rope.scaling.type=bogus", _set(g, f"{a}.rope.scaling.type", STR, b"bogus")
    yield "rope.scaling.factor=-1", _set(g, f"{a}.rope.scaling.factor", F32, -1.0)
    yield "expert_count=1000000", _set(g, f"{a}.expert_count", U32, 1_000_000)
    yield "expert_used>expert_count", _set(_set(g, f"{a}.expert_count", U32, 2), f"{a}.expert_used_count", U32, 3)
    yield "expert_used-without-experts", _set(g, f"{a}.expert_used_count", U32, 2)
    yield "expert_used-bool-array", _set(g, f"{a}.expert_used_count", ARR, (BOOL, [True]))  # read as 1
    yield "expert_count-without-tensors", _set(_set(g, f"{a}.expert_count", U32, 4),
                                               f"{a}.expert_used_count", U32, 2)
    yield "nextn_predict_layers>block_count", _set(g, f"{a}.nextn_predict_layers", U32, 5)
    yield "vocab_size-mismatch", _set(g, f"{a}.vocab_size", U32, 7)
    yield "file_type=9999", _set(g, "general.file_type", U32, 9999)
    yield "sliding_window=0", _set(g, f"{a}.attention.sliding_window", U32, 0)
    yield "pooling_type=99", _set(g, f"{a}.pooling_type", U32, 99)

    # Tokenizer arrays.
    toks = _tokens(g)
    n = len(toks)
    scores = g.kv("tokenizer.ggml.scores").value[1]
    types = g.kv("tokenizer.ggml.token_type").value[1]
    yield "tokens-missing", _drop(g, "tokenizer.ggml.tokens")
    yield "tokens-empty", _with_tokens(g, [])
    yield "tokens-one", _with_tokens(g, toks[:1])
    yield "tokens-short", _with_tokens(g, toks[: n // 2])
    yield "tokens-as-int32", _set(g, "tokenizer.ggml.tokens", ARR, (I32, list(range(n))))
    yield "tokens-as-string", _set(g, "tokenizer.ggml.tokens", STR, b"a")
    yield "tokens-with-empty-string", _with_tokens(g, toks[:300] + [b""] + toks[301:])
    yield "tokens-invalid-utf8", _with_tokens(g, toks[:300] + [b"\xff\xfe\xfd"] + toks[301:])
    yield "tokens-with-nul", _with_tokens(g, toks[:300] + [b"a\0b"] + toks[301:])
    yield "tokens-huge-string", _with_tokens(g, toks[:300] + [b"z" * 100000] + toks[301:])
    yield "tokens-duplicate", _with_tokens(g, toks[:300] + [toks[299]] + toks[301:])
    yield "tokens-duplicate-byte", _with_tokens(g, toks[:4] + [toks[3]] + toks[5:])
    yield "tokens-all-same", _with_tokens(g, [b"a"] * n)
    yield "scores-short", _set(g, "tokenizer.ggml.scores", ARR, (F32, scores[: n // 2]))
    yield "scores-as-string-array", _set(g, "tokenizer.ggml.scores", ARR, (STR, [b"0"] * n))
    yield "scores-as-f64", _set(g, "tokenizer.ggml.scores", ARR, (F64, scores))
    yield "scores-nan", _set(g, "tokenizer.ggml.scores", ARR, (F32, [float("nan")] * n))
    yield "token_type-short", _set(g, "tokenizer.ggml.token_type", ARR, (I32, types[: n // 2]))
    yield "token_type-as-u8", _set(g, "tokenizer.ggml.token_type", ARR, (U8, types))
    yield "token_type-out-of-range", _set(g, "tokenizer.ggml.token_type", ARR, (I32, [99] * 10 + types[10:]))
    yield "token_type-negative", _set(g, "tokenizer.ggml.token_type", ARR, (I32, [-1] * n))
    yield "token_type-all-byte", _set(g, "tokenizer.ggml.token_type", ARR, (I32, [6] * n))
    yield "token_type-all-control", _set(g, "tokenizer.ggml.token_type", ARR, (I32, [3] * n))
    # Byte tokens renamed to ordinary pieces: same vocabulary size, no byte fallback.
    no_bytes = [f"zz{i}".encode() if 3 <= i < 259 else t for i, t in enumerate(toks)]
    nb_types = [1 if 3 <= i < 259 else t for i, t in enumerate(types)]

    def without_byte_tokens(m: Gguf) -> Gguf:
        m = _with_tokens(m, no_bytes)
        return _set(m, "tokenizer.ggml.token_type", ARR, (I32, nb_types))
    yield "tokens-without-byte-tokens", without_byte_tokens(g)
    bad_byte = list(toks)
    bad_byte[3 + 10] = b"<0x>"
    yield "byte-token-malformed", _with_tokens(g, bad_byte)
    bad_byte2 = list(toks)
    bad_byte2[3 + 10] = b"<"
    yield "byte-token-too-short", _with_tokens(g, bad_byte2)
    for key in ("bos", "eos", "unknown", "eot", "padding", "seperator"):
        for v in (n, 2**31, 2**32 - 1):
            yield f"{key}_token_id={v}", _set(g, f"tokenizer.ggml.{key}_token_id", U32, v)
    yield "bos_token_id-as-i32-neg", _set(g, "tokenizer.ggml.bos_token_id", I32, -5)
    yield "bos_token_id-as-string", _set(g, "tokenizer.ggml.bos_token_id", STR, b"1")
    yield "add_bos-as-u32", _set(g, "tokenizer.ggml.add_bos_token", U32, 7)
    for model in (b"bert", b"gpt2", b"t5", b"rwkv", b"plamo2", b"gemma4", b"test", b"hybriddna", b"whitespace",
                  b"none", b"no_vocab", b"", b"nonesuch"):
        name = model.decode() or "empty"
        yield f"tokenizer.model={name}", _set(g, "tokenizer.ggml.model", STR, model)
    yield "tokenizer.model=bert-without-byte-tokens", _set(without_byte_tokens(g), "tokenizer.ggml.model", STR, b"bert")
    yield "tokenizer.model=rwkv-without-byte-tokens", _set(without_byte_tokens(g), "tokenizer.ggml.model", STR, b"rwkv")
    yield "tokenizer.model-missing", _drop(g, "tokenizer.ggml.model")
    yield "tokenizer.model-as-int", _set(g, "tokenizer.ggml.model", U32, 1)
    yield "tokenizer.pre=nonesuch", _set(g, "tokenizer.ggml.pre", STR, b"nonesuch")
    gpt2 = _set(g, "tokenizer.ggml.model", STR, b"gpt2")
    yield "gpt2-merges-empty", _set(gpt2, "tokenizer.ggml.merges", ARR, (STR, []))
    yield "gpt2-merges-no-space", _set(gpt2, "tokenizer.ggml.merges", ARR, (STR, [b"ab", b"", b" "]))
    yield "gpt2-merges-as-int", _set(gpt2, "tokenizer.ggml.merges", ARR, (I32, [1, 2]))
    yield "t5-charsmap-tiny", _set(_set(g, "tokenizer.ggml.model", STR, b"t5"),
                                   "tokenizer.ggml.precompiled_charsmap", ARR, (U8, [1, 2]))
    yield "t5-charsmap-overrun", _set(_set(g, "tokenizer.ggml.model", STR, b"t5"),
                                      "tokenizer.ggml.precompiled_charsmap", ARR, (U8, [255, 255, 255, 127, 0, 0]))
    yield "suppress_tokens-out-of-range", _set(g, "tokenizer.ggml.suppress_tokens", ARR, (I32, [-1, n, 2**31 - 1]))
    yield "chat_template-invalid-utf8", _set(g, "tokenizer.chat_template", STR, b"{{ \xff }}")
    yield "chat_template-as-int", _set(g, "tokenizer.chat_template", U32, 1)


def _copy_with_raw_key(g: Gguf, key: bytes) -> Gguf:
    m = _copy(g)
    m.kvs.append(KV(key, U32, 1))
    return m


def corpus(directory: Path) -> list[tuple[str, bytes]]:
    """Every deterministic mutant as (name, file bytes), in a fixed order."""
    _, g = base_model(directory)
    out: list[tuple[str, bytes]] = list(_structural(g))
    for name, m in (*_tensor_mutants(g), *_kv_mutants(g)):
        out.append((name, serialize(m)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise RuntimeError("duplicate mutant names")
    return out


def random_mutants(base: bytes, n: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``n`` seeded random mutants: bit flips, byte overwrites, 8-byte overwrites with extreme values.

    Mutations favour the metadata and tensor-info part of the file (where
    parsing happens); the data section only holds weights.
    """
    rng = random.Random(seed)
    meta_end = len(base) - len(parse(base).data)  # where the tensor data starts
    for i in range(n):
        buf = bytearray(base)
        kind = rng.choice(("flip", "byte", "u64", "multi"))
        limit = meta_end if rng.random() < 0.9 else len(buf)
        if kind == "flip":
            pos = rng.randrange(limit)
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            pos = rng.randrange(limit)
            buf[pos] = rng.randrange(256)
        elif kind == "u64":
            pos = rng.randrange(max(1, limit - 8))
            val = rng.choice((0, 1, 2**31, 2**32 - 1, 2**32, I64_MAX, 2**63, U64_MAX, len(buf)))
            buf[pos:pos + 8] = struct.pack("<Q", val)
        else:
            for _ in range(rng.randrange(2, 16)):
                buf[rng.randrange(limit)] = rng.randrange(256)
        yield f"random-{seed}-{i}-{kind}", bytes(buf)


def _known_keys() -> list[str]:
    """Metadata keys llama.cpp reads (from the vendored llama-arch.cpp when present)."""
    src = Path(__file__).parent.parent / "vendor" / "llama.cpp" / "src" / "llama-arch.cpp"
    keys = ["%s.block_count", "%s.context_length", "%s.embedding_length", "%s.feed_forward_length",
            "%s.attention.head_count", "%s.attention.head_count_kv", "%s.rope.dimension_count",
            "%s.expert_count", "%s.expert_used_count", "tokenizer.ggml.bos_token_id"]
    if src.exists():
        import re

        keys = sorted(set(re.findall(r'"((?:%s|tokenizer|general)\.[a-z0-9_.]+)"', src.read_text())))
    return [k.replace("%s", ARCH) for k in keys]


def semantic_mutants(g: Gguf, n: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``n`` seeded mutants that set 1-3 metadata keys llama.cpp reads to random typed values."""
    rng = random.Random(seed)
    keys = _known_keys()
    ints = (0, 1, 2, 3, 7, 64, 255, 256, 511, 512, 513, 1024, 2**16, 2**31 - 1, 2**31, 2**32 - 1)
    floats = (0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), float("-inf"))

    def value() -> tuple[int, Any]:
        kind = rng.randrange(6)
        if kind == 0:
            return U32, rng.choice(ints)
        if kind == 1:
            return I32, rng.choice((-1, -(2**31), 0, 1, 2**31 - 1))
        if kind == 2:
            return F32, rng.choice(floats)
        if kind == 3:
            return BOOL, rng.random() < 0.5
        if kind == 4:
            return STR, rng.choice((b"", b"none", b"linear", b"yarn", b"llama", b"gpt2", b"x" * 300))
        etype = rng.choice((U32, I32, F32, BOOL))
        count = rng.choice((0, 1, 2, 600))
        if etype == F32:
            return ARR, (etype, [rng.choice(floats) for _ in range(count)])
        if etype == BOOL:
            return ARR, (etype, [rng.random() < 0.5 for _ in range(count)])
        return ARR, (etype, [rng.choice(ints) % 2**31 for _ in range(count)])

    for i in range(n):
        m = g
        names = []
        for _ in range(rng.randrange(1, 4)):
            key = rng.choice(keys)
            vtype, v = value()
            m = _set(m, key, vtype, v)
            names.append(key.split(".")[-1])
        yield f"semantic-{seed}-{i}-{'+'.join(names)}"[:100], serialize(m)


def write_corpus(directory: Path, *, n_random: int = 0, seed: int = 0) -> list[Path]:
    """Write the corpus (and ``n_random`` random mutants) as ``NNNN-name.gguf`` files."""
    directory.mkdir(parents=True, exist_ok=True)
    items = corpus(directory)
    if n_random:
        items += list(random_mutants((directory / "base.gguf").read_bytes(), n_random, seed))
    paths = []
    for i, (name, data) in enumerate(items):
        safe = "".join(c if c.isalnum() or c in "._=-+@^" else "_" for c in name)[:120]
        p = directory / f"{i:04d}-{safe}.gguf"
        p.write_bytes(data)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the malformed-GGUF corpus.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--random", type=int, default=0, help="also write N seeded random mutants")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_corpus(args.out, n_random=args.random, seed=args.seed)
    print(f"{len(paths)} mutants in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
