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
    python tests/mutants.py OUT_DIR --projector     # mutants of tests/synth.py's projectors (mmproj)

``projector_corpus`` does the same for multimodal projectors: every tensor and
``clip.*`` key of the synthetic vision ("mlp"), audio ("qwen2a") and
vision+audio projectors dropped, retyped, reshaped or set to edge values, the
files cut at every section boundary, and a few seeded bit flips.
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


# --- multimodal projectors ---------------------------------------------------------------------------
#: the synthetic projectors the projector corpus mutates: name -> ``synth.write_projector`` arguments.
#: Each is for the text model of ``synth.write_llama_model`` (n_embd 64, PROJECTOR_N_EMBD_TEXT).
PROJECTOR_BASES: dict[str, dict[str, Any]] = {
    "vision": dict(vision=True),  # LLaVA "mlp"
    "audio": dict(vision=False, audio=True),  # Qwen2-Audio "qwen2a"
    "both": dict(vision=True, audio=True),  # Qwen2.5-Omni's layout: both towers, per-modality projector types
}
PROJECTOR_N_EMBD_TEXT = 64


def projector_bases(directory: Path) -> dict[str, Gguf]:
    """Write the valid base projectors into ``directory`` (``proj-<name>.gguf``) and return them parsed."""
    out = {}
    for name, kw in PROJECTOR_BASES.items():
        path = synth.write_projector(directory / f"proj-{name}.gguf", n_embd_text=PROJECTOR_N_EMBD_TEXT, **kw)
        g = parse(path.read_bytes())
        if serialize(g) != path.read_bytes():
            raise RuntimeError("mutants.py cannot round-trip the base projector; the GGUF layout changed")
        out[name] = g
    return out


def _retyped(kv: KV) -> Iterator[tuple[str, int, Any]]:
    """Other GGUF types for one key's value: (label, type, value)."""
    v = kv.value
    if kv.vtype == U32:
        yield from (("int32", I32, v), ("uint8", U8, v % 256), ("uint64", U64, v), ("float32", F32, float(v)),
                    ("string", STR, str(v).encode()), ("array", ARR, (U32, [v])))
    elif kv.vtype == BOOL:
        yield from (("uint8", U8, int(v)), ("int32", I32, int(v)), ("array", ARR, (BOOL, [v])))
    elif kv.vtype == F32:
        yield from (("float64", F64, v), ("uint32", U32, 0), ("array", ARR, (F32, [v])))
    elif kv.vtype == STR:
        yield from (("uint32", U32, 1), ("array", ARR, (STR, [v])))
    elif kv.vtype == ARR:
        etype, items = v
        if etype == F32:
            yield from (("scalar", F32, items[0]), ("float64-array", ARR, (F64, items)),
                        ("int32-array", ARR, (I32, [int(x) for x in items])), ("2-elements", ARR, (F32, items[:2])),
                        ("empty", ARR, (F32, [])), ("string", STR, b"0.5"))


def _projector_kv_mutants(g: Gguf, *, values: bool = True) -> Iterator[tuple[str, Gguf]]:
    """Metadata mutants of one base projector: every clip.* key dropped and retyped, the encoder flags and
    projector types, then (``values``) edge values of the hyper-parameters. Without ``values`` only the
    projector types are retyped (the other keys are the single-tower bases' too)."""
    has = {mod: any(kv.key == f"clip.{mod}.embedding_length".encode() for kv in g.kvs) for mod in ("vision", "audio")}
    for kv in g.kvs:
        key = kv.key.decode()
        if key.startswith("clip.") or key == "general.architecture":
            yield f"drop:{key}", _drop(g, key)
        if key.startswith(("clip.", "general.")) and (values or key.endswith("projector_type")):
            for label, vtype, value in _retyped(kv):
                yield f"type:{key}={label}", _set(g, key, vtype, value)

    yield "arch=llama", _set(g, "general.architecture", STR, b"llama")
    for mod, on in has.items():
        yield f"has_{mod}_encoder={not on}", _set(g, f"clip.has_{mod}_encoder", BOOL, not on)
    yield "has_gen_audio_encoder=True", _set(g, "clip.has_gen_audio_encoder", BOOL, True)
    type_keys = [kv.key.decode() for kv in g.kvs if kv.key.endswith(b"projector_type")]
    for key in type_keys:
        for ptype in (b"", b"nonesuch", b"mlp", b"qwen2a", b"ldp", b"gemma3", b"ultravox", b"qwen2.5o", b"qwen25vl"):
            if ptype != g.kv(key).value:
                yield f"{key}={ptype.decode() or 'empty'}", _set(g, key, STR, ptype)
    if len(type_keys) == 2:  # both: one generic type for both towers
        yield "projector_type=mlp-for-both", _set(g, "clip.projector_type", STR, b"mlp")
    yield "use_gelu+use_silu", _set(_set(g, "clip.use_gelu", BOOL, True), "clip.use_silu", BOOL, True)
    yield "use_silu", _set(g, "clip.use_silu", BOOL, True)
    yield "use_gelu", _set(g, "clip.use_gelu", BOOL, True)
    if not values:
        return

    for mod, on in has.items():
        if not on:
            continue
        k = f"clip.{mod}."
        for v in (0, 3, 5, 64, 2**31, 2**32 - 1):
            yield f"{mod}.head_count={v}", _set(g, k + "attention.head_count", U32, v)
        for v in (0, 1, 3, 8, 64):
            yield f"{mod}.head_count_kv={v}", _set(g, k + "attention.head_count_kv", U32, v)
        for v in (0, 3, 16, 1024):
            yield f"{mod}.head_dim={v}", _set(g, k + "attention.head_dim", U32, v)
        for v in (0, 16, 48, 64, 2**31):
            yield f"{mod}.embedding_length={v}", _set(g, k + "embedding_length", U32, v)
        for v in (0, 1, 3, 100, 2**31 - 1, 2**31):
            yield f"{mod}.block_count={v}", _set(g, k + "block_count", U32, v)
        for v in (0, 7, 128, 2**31):
            yield f"{mod}.feed_forward_length={v}", _set(g, k + "feed_forward_length", U32, v)
        for v in (0, 32, 63, 128, 2**31):
            yield f"{mod}.projection_dim={v}", _set(g, k + "projection_dim", U32, v)
        for eps in (0.0, -1.0, float("nan"), float("inf"), 1e30):
            yield f"{mod}.layer_norm_epsilon={eps}", _set(g, k + "attention.layer_norm_epsilon", F32, eps)
        for layers in ([0], [1], [2], [5], [0, 1], [-1], [2**31 - 1]):
            yield f"{mod}.feature_layer={layers}", _set(g, k + "feature_layer", ARR, (I32, layers))
        yield f"{mod}.feature_layer-as-u32", _set(g, k + "feature_layer", ARR, (U32, [0]))
    if has["vision"]:
        k = "clip.vision."
        for v in (0, 8, 16, 31, 33, 64, 336, 8192, 8193, 2**31):
            yield f"image_size={v}", _set(g, k + "image_size", U32, v)
        for v in (0, 1, 3, 7, 16, 32, 33, 64, 65536, 2**31):
            yield f"patch_size={v}", _set(g, k + "patch_size", U32, v)
        for n in (2, 1, 0):
            yield f"image_mean-{n}-elements", _set(g, k + "image_mean", ARR, (F32, [0.5] * n))
        yield "image_std-zero", _set(g, k + "image_std", ARR, (F32, [0.0, 0.0, 0.0]))
        yield "image_std-nan", _set(g, k + "image_std", ARR, (F32, [float("nan")] * 3))
        for pins in ([32], [0, 0], [32, 32], [64, 32, 32, 64], [-32, 32], [2**31 - 1, 2**31 - 1]):
            yield f"image_grid_pinpoints={pins}", _set(g, k + "image_grid_pinpoints", ARR, (I32, pins))
        yield "mm_patch_merge_type=spatial_unpad", _set(g, k + "mm_patch_merge_type", STR, b"spatial_unpad")
        yield "mm_patch_merge_type=spatial_unpad+pinpoints", _set(
            _set(g, k + "mm_patch_merge_type", STR, b"spatial_unpad"), k + "image_grid_pinpoints", ARR,
            (I32, [32, 32, 64, 32]))
        for key in ("image_min_pixels", "image_max_pixels", "projector.scale_factor", "spatial_merge_size",
                    "n_wa_pattern", "window_size", "preproc_image_size"):
            for v in (0, 2**31 - 1):
                yield f"{key}={v}", _set(g, k + key, U32, v)
        yield "image_max<min_pixels", _set(_set(g, k + "image_min_pixels", U32, 1000), k + "image_max_pixels", U32, 10)
        yield "minicpmv_version=2", _set(g, "clip.minicpmv_version", I32, 2)
        yield "minicpmv_version-as-u32", _set(g, "clip.minicpmv_version", U32, 2)
        yield "minicpmv_query_num=0", _set(g, "clip.minicpmv_query_num", U32, 0)
    if has["audio"]:
        for v in (0, 1, 80, 127, 129, 256, 257, 2**31):
            yield f"num_mel_bins={v}", _set(g, "clip.audio.num_mel_bins", U32, v)
        for v in (0, 1, 2**31 - 1):
            yield f"audio.projector.stack_factor={v}", _set(g, "clip.audio.projector.stack_factor", U32, v)


#: ggml type -> (elements per block, bytes per block) for the types the projector mutants use
#: (f32, f16, q4_0, q8_0, i32, f64, bf16)
_GGML_BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34), 26: (1, 4), 28: (1, 8), 30: (1, 2)}


def _relaid(base: Gguf, m: Gguf, like: dict[bytes, bytes] | None = None) -> Gguf:
    """``m`` (tensor infos edited from ``base``'s) with its data section laid out anew, as gguf requires
    (each tensor right after the one before, aligned): each tensor's bytes are its bytes in ``base`` (or
    those of the tensor ``like`` names for it), cut or zero-padded to its new size. Tensors of a type of
    unknown size keep their place."""
    old = {t.name: t for t in base.tensors}
    old |= {new: old[src] for new, src in (like or {}).items()}

    def nbytes(t: TensorInfo) -> int | None:
        if t.ggml_type not in _GGML_BLOCK:
            return None
        blk, size = _GGML_BLOCK[t.ggml_type]
        n = 1
        for d in t.ne:
            n *= d
        return -(-n // blk) * size

    m = _copy(m)
    data = bytearray()
    for t in m.tensors:
        n = nbytes(t)
        src = old.get(t.name)
        if n is None or src is None:
            continue
        raw = base.data[src.offset:src.offset + (nbytes(src) or 0)][:n]
        t.offset = len(data)
        data += raw + b"\0" * (n - len(raw)) + b"\0" * (-n % base.alignment)
    m.data = bytes(data)
    return m


def _projector_tensor_mutants(g: Gguf, *, shapes: bool = True) -> Iterator[tuple[str, Gguf]]:
    """Tensor mutants of one base projector, each with its data laid out anew (so that gguf's parser
    accepts it and the loader sees it): each tensor dropped, then (``shapes``) transposed, shrunk,
    retyped; position rows cut; one block more. Then a duplicate name and half the data."""
    def edit(which: bytes, **kw: Any) -> Gguf:
        m = _copy(g)
        for t in m.tensors:
            if t.name == which:
                for k, v in kw.items():
                    setattr(t, k, v)
        return _relaid(g, m)

    for i, t in enumerate(g.tensors):
        name = t.name.decode()
        m = _copy(g)
        del m.tensors[i]
        yield f"drop:{name}", _relaid(g, m)
        if not shapes:
            continue
        if len(t.ne) > 1 and t.ne[::-1] != t.ne:
            yield f"transpose:{name}", edit(t.name, ne=t.ne[::-1])
        if t.ne[-1] > 1:  # one row (or element) fewer
            yield f"shrink:{name}", edit(t.name, ne=t.ne[:-1] + [t.ne[-1] - 1])
        if len(t.ne) == 2 and t.ne[0] == 1:  # a [1, n] bias as a vector
            yield f"flatten:{name}", edit(t.name, ne=t.ne[1:])
        if len(t.ne) == 1 and t.ne[0] > 1:
            yield f"as-2d:{name}", edit(t.name, ne=[1, t.ne[0]])
        if t.ne[0] > 1 and len(t.ne) > 1:
            yield f"halve-ne0:{name}", edit(t.name, ne=[t.ne[0] // 2] + t.ne[1:])
    if not shapes:
        return
    for t in g.tensors:
        if t.name.endswith(b"position_embd.weight"):
            name = t.name.decode()
            for rows in (t.ne[1] - 2, t.ne[1] // 2, 16, 1, t.ne[1] + 7):
                yield f"rows={rows}:{name}", edit(t.name, ne=[t.ne[0], rows])
    # Types: f16, q8_0 (ne0 a multiple of 32) or i32 data instead of f32, and an unknown type.
    for t in g.tensors:
        name = t.name.decode()
        if name.startswith(("mm.", "v.patch", "v.class", "v.position", "a.conv1d.1.", "a.position")) or name[1:] in (
                ".blk.0.ln1.weight", ".blk.0.attn_q.weight", ".blk.0.attn_q.bias", ".blk.0.ffn_down.weight"):
            for label, ggml_type in (("f16", 1), ("q8_0", 8), ("i32", 26)):
                if ggml_type != 8 or t.ne[0] % 32 == 0:
                    yield f"tensor-type={label}:{name}", edit(t.name, ggml_type=ggml_type)
    yield "tensor-type=unknown", edit(g.tensors[-1].name, ggml_type=255)
    # A tower's last block duplicated as one more block (block_count + 1 with tensors for it).
    for prefix, key in ((b"v.blk.", "clip.vision.block_count"), (b"a.blk.", "clip.audio.block_count")):
        blk = [t for t in g.tensors if t.name.startswith(prefix + b"1.")]
        if blk:
            m = _set(g, key, U32, 3)
            m.tensors += [replace(t, name=t.name.replace(prefix + b"1.", prefix + b"2."), ne=list(t.ne)) for t in blk]
            yield f"extra-block:{key}", _relaid(g, m, {t.name.replace(prefix + b"1.", prefix + b"2."): t.name
                                                       for t in blk})
    m = _copy(g)
    m.tensors[1].name = m.tensors[0].name
    yield "tensor:duplicate-name", m
    m = _copy(g)
    m.data = m.data[: len(m.data) // 2]
    yield "tensor:data-half", m


def _projector_extra_mutants(g: Gguf) -> Iterator[tuple[str, Gguf]]:
    """Tensors the synthetic projectors lack but llama.cpp's graphs use when present (fused QKV, per-head
    norms, layer scales, a gate, experts, Yi-VL's normed projector), of the right shape and of a wrong one."""
    have = {t.name: t for t in g.tensors}

    def add(*extra: tuple[str, str, list[int] | None], rename: dict[str, str] | None = None) -> Gguf:
        """Tensors ``(name, copied from, shape or None for the same)``; ``rename``: old name -> new name."""
        m = _copy(g)
        like = {}
        for t in m.tensors:
            new = (rename or {}).get(t.name.decode())
            if new:
                like[new.encode()] = t.name
                t.name = new.encode()
        for name, src, ne in extra:
            t = have[src.encode()]
            m.tensors.append(replace(t, name=name.encode(), ne=list(ne or t.ne)))
            like[name.encode()] = t.name
        return _relaid(g, m, like)

    if b"mm.0.weight" in have:
        e, h = have[b"v.pre_ln.weight"].ne[0], have[b"mm.0.bias"].ne[0]
        for ne in ([e], [7]):
            yield f"extra:v.patch_embd.bias={ne}", add(("v.patch_embd.bias", "v.pre_ln.bias", ne))
            yield f"extra:v.post_ln={ne}", add(("v.post_ln.weight", "v.pre_ln.weight", ne),
                                               ("v.post_ln.bias", "v.pre_ln.bias", ne))
        up = have[b"v.blk.0.ffn_up.weight"].ne
        for ne in (up, [up[0], 7]):
            yield f"extra:v.blk.0.ffn_gate.weight={ne}", add(("v.blk.0.ffn_gate.weight", "v.blk.0.ffn_up.weight", ne))
        yield "extra:mm.3.weight", add(("mm.3.weight", "mm.2.weight", None))
        # Yi-VL: mm.0 -> layer norm mm.1 -> GELU -> mm.3 -> layer norm mm.4 (no mm.2); valid, then each piece off
        yi = [("mm.1.weight", "mm.0.bias", [h]), ("mm.1.bias", "mm.0.bias", [h]), ("mm.4.weight", "mm.2.bias", [h]),
              ("mm.4.bias", "mm.2.bias", [h])]
        rename = {"mm.2.weight": "mm.3.weight", "mm.2.bias": "mm.3.bias"}
        yield "yi-llava", add(*yi, rename=rename)
        for i in range(len(yi)):
            yield f"yi-llava:drop:{yi[i][0]}", add(*yi[:i], *yi[i + 1:], rename=rename)
        yield "yi-llava:drop:mm.3.bias", add(*yi, rename={"mm.2.weight": "mm.3.weight"})
        yield "yi-llava:mm.4.weight=[7]", add(*yi[:2], ("mm.4.weight", "mm.2.bias", [7]), yi[3], rename=rename)
        yield "yi-llava:projector_type=mlp_norm", _set(add(*yi, rename=rename), "clip.projector_type", STR, b"mlp_norm")
        yield "projector_type=mlp_norm", _set(g, "clip.projector_type", STR, b"mlp_norm")
    if b"a.conv1d.1.weight" in have:
        e = have[b"a.post_ln.weight"].ne[0]
        up = have[b"a.blk.0.ffn_up.weight"].ne
        yield "extra:a.blk.0.attn_k.bias", add(("a.blk.0.attn_k.bias", "a.blk.0.attn_q.bias", None))
        yield "extra:a.blk.1.attn_k.bias", add(("a.blk.1.attn_k.bias", "a.blk.1.attn_q.bias", None))
        yield "extra:a.pre_ln", add(("a.pre_ln.weight", "a.post_ln.weight", None),
                                    ("a.pre_ln.bias", "a.post_ln.bias", None))
        for ne in ([e], [e // 4], [7]):  # the whole row, one head's (head_dim 8), neither
            for name in ("attn_q_norm", "attn_k_norm"):
                yield f"extra:a.blk.0.{name}.weight={ne}", add((f"a.blk.0.{name}.weight", "a.blk.0.ln1.weight", ne))
        for name in ("ls1", "ls2", "out_scale", "attn_post_norm", "ffn_post_norm"):
            for ne in ([e], [7]):
                yield f"extra:a.blk.0.{name}.weight={ne}", add((f"a.blk.0.{name}.weight", "a.blk.0.ln1.weight", ne))
        for ne in ([e, 3 * e], [e, 2 * e]):
            yield f"extra:a.blk.0.attn_qkv.weight={ne}", add(("a.blk.0.attn_qkv.weight", "a.blk.0.attn_q.weight", ne))
        yield "extra:a.blk.0.attn_qkv+bias", add(("a.blk.0.attn_qkv.weight", "a.blk.0.attn_q.weight", [e, 3 * e]),
                                                 ("a.blk.0.attn_qkv.bias", "a.blk.0.attn_q.bias", [3 * e]))
        for ne in (up, [up[0], 7]):
            yield f"extra:a.blk.0.ffn_gate.weight={ne}", add(("a.blk.0.ffn_gate.weight", "a.blk.0.ffn_up.weight", ne))
        yield "extra:a.blk.0.ffn_gate_exps.weight", add(("a.blk.0.ffn_gate_exps.weight", "a.blk.0.ffn_up.weight",
                                                          [up[0], up[1], 2]))
        yield "extra:a.blk.0.attn_sinks", add(("a.blk.0.attn_sinks", "a.blk.0.ln1.weight", [4]))


def _projector_structural(g: Gguf) -> Iterator[Mutant]:
    """Truncations at the section boundaries of a base projector: the header, every key, the first and last
    tensor info, the data section's start (and a byte either side) and three tensors' data."""
    lay = Layout()
    buf = serialize(g, lay)
    first, last = g.tensors[0].name.decode(), g.tensors[-1].name.decode()
    middle = g.tensors[len(g.tensors) // 2].name.decode()
    cuts: dict[int, str] = {}
    for label, off in lay.marks:
        kind, _, what = label.partition(":")
        if kind.startswith("ti") and what not in (first, last):
            continue
        if kind == "tensor-data" and what not in (first, middle, last):
            continue
        deltas = (-1, 0, 1) if kind in ("data", "end", "padding", "tensor-data") else (0,)
        for d in deltas:
            if 0 < off + d < len(buf):
                cuts.setdefault(off + d, f"{label}{d:+d}" if d else label)
    for off, label in sorted(cuts.items()):
        yield f"truncate@{off}:{label}", buf[:off]


def projector_corpus(directory: Path, *, n_random: int = 30, seed: int = 0) -> list[tuple[str, bytes]]:
    """Every deterministic projector mutant as (name, file bytes), in a fixed order: each family over each
    base of ``PROJECTOR_BASES`` (names ``<base>:<mutant>``), then ``n_random`` seeded random mutants
    spread over the bases. Each base itself comes first (``<base>:valid``)."""
    bases = projector_bases(directory)
    out: list[tuple[str, bytes]] = []
    for base, g in bases.items():
        out.append((f"{base}:valid", serialize(g)))
        single = base != "both"  # values and shapes once per tower; both: its own keys, each tensor dropped
        extra = _projector_extra_mutants(g) if single else iter(())
        for name, m in (*_projector_kv_mutants(g, values=single), *_projector_tensor_mutants(g, shapes=single), *extra):
            out.append((f"{base}:{name}", serialize(m)))
        out += [(f"{base}:{name}", data) for name, data in _projector_structural(g)]
    # A projector made for a text model of width 32 (refused: the text model is 64 wide), with projection_dim
    # saying 64 or missing (the tensors decide the width).
    narrow = parse(synth.write_projector(directory / "proj-narrow.gguf", n_embd_text=32).read_bytes())
    out.append(("narrow:valid-for-32", serialize(narrow)))
    out.append(("narrow:projection_dim=64", serialize(_set(narrow, "clip.vision.projection_dim", U32, 64))))
    out.append(("narrow:projection_dim-missing", serialize(_drop(narrow, "clip.vision.projection_dim"))))
    names = list(bases)
    per = -(-n_random // len(names)) if n_random else 0
    for i, base in enumerate(names):
        k = min(per, n_random - i * per)
        if k > 0:
            raw = serialize(bases[base])
            out += [(f"{base}:{name}", data) for name, data in random_mutants(raw, k, seed + i)]
    seen = [n for n, _ in out]
    if len(set(seen)) != len(seen):
        raise RuntimeError("duplicate mutant names")
    return out


def write_corpus(directory: Path, *, n_random: int | None = None, seed: int = 0,
                 projector: bool = False) -> list[Path]:
    """Write the corpus (and ``n_random`` random mutants: default none) as ``NNNN-name.gguf`` files;
    ``projector``: the projector corpus instead (``n_random`` seeded bit flips and byte overwrites spread
    over its bases: default 30)."""
    directory.mkdir(parents=True, exist_ok=True)
    if projector:
        items = projector_corpus(directory, n_random=30 if n_random is None else n_random, seed=seed)
    else:
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
    parser.add_argument("--random", type=int, help="also write N seeded random mutants (default: none, 30 with "
                                                    "--projector)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projector", action="store_true",
                        help="the multimodal projector corpus instead")
    args = parser.parse_args(argv)
    paths = write_corpus(args.out, n_random=args.random, seed=args.seed, projector=args.projector)
    print(f"{len(paths)} mutants in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
