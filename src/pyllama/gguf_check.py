"""Pre-load checks of GGUF files: what llama.cpp's loader asserts on instead of failing.

llama.cpp refuses most malformed files with an error, but a few well-formed
GGUF files with impossible metadata reach a ``GGML_ASSERT`` or ``GGML_ABORT``
and kill the process. :func:`check_model_file` reads the metadata with
llama.cpp's own GGUF parser (``gguf_init_from_file``, metadata only) before
``llama_model_load_from_file`` and raises :class:`~pyllama.errors.ModelLoadError`
for exactly those cases.

Each check names the vendored llama.cpp line it guards (``GUARDS`` lists them
all, and a test verifies each line still asserts), so that moving the pin shows
which checks still apply: when a line no longer asserts, its check can go.
``tests/test_malformed.py`` loads a corpus of malformed files that hits every check.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ._ffi import ffi, lib
from .errors import ModelLoadError, TokenizationError

# vendor/llama.cpp/src/llama-hparams.h:11-12
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
# vendor/llama.cpp/src/llama-model.cpp:1034 (LLAMA_ROPE_SCALING_TYPES)
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
TOKEN_TYPE_BYTE = int(lib.LLAMA_TOKEN_TYPE_BYTE)


@dataclass(frozen=True)
class Guard:
    """One check and the vendored llama.cpp line it guards (``source`` text must be on ``path:line``)."""

    path: str  # relative to vendor/llama.cpp
    line: int
    source: str  # the asserting code on that line
    why: str


#: check name -> the llama.cpp line it guards. tests/test_malformed.py verifies each line still holds
#: its assert: when a pin bump moves or drops one, that test names the check to revisit.
GUARDS: dict[str, Guard] = {
    "block_count": Guard("src/llama-model.cpp", 1328,
                         "GGML_ASSERT(hparams.n_layer_all > 0 && hparams.n_layer_all <= LLAMA_MAX_LAYERS);",
                         "<arch>.block_count 0 or above LLAMA_MAX_LAYERS"),
    "nextn_predict_layers": Guard("src/llama-model.cpp", 1330,
                                  "GGML_ASSERT(hparams.n_layer_nextn <= hparams.n_layer_all);",
                                  "nextn_predict_layers above block_count"),
    "wavtokenizer_blocks": Guard("src/llama-model.cpp", 1354,
                                 "GGML_ASSERT(hparams.posnet.n_layer   <= hparams.n_layer_all);",
                                 "posnet/convnext block counts above block_count (:1354-1355)"),
    "experts": Guard("src/llama-model.cpp", 1361, "GGML_ASSERT(hparams.n_expert <= LLAMA_MAX_EXPERTS);",
                     "expert counts and groups inconsistent (:1361-1373)"),
    "rope_scaling_type": Guard("src/llama-model.cpp", 1420,
                               "GGML_ASSERT(hparams.rope_scaling_type_train != LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED);",
                               "unknown rope.scaling.type"),
    "norm_epsilon": Guard("ggml/src/ggml-cpu/ops.cpp", 4132, "GGML_ASSERT(eps >= 0.0f);",
                          "negative or NaN norm epsilon, at the first decode (also :4026, :4502)"),
    "unique_tokens": Guard("src/llama-vocab.cpp", 2544, "GGML_ASSERT(id_to_token.size() == token_to_id.size());",
                           "a token repeated in tokenizer.ggml.tokens (as C strings: cut at NUL)"),
    "wpm_byte_tokens": Guard("src/llama-vocab.cpp", 3207, 'GGML_ABORT("fatal error");',
                             "WordPiece ('bert') vocabulary with byte tokens: token_to_byte aborts while the "
                             "piece cache is built"),
    "no_vocab": Guard("src/llama-vocab.cpp", 3422,
                      'GGML_ASSERT(tokenizer && "Tokenizer not initialized. Call llama_vocab::init_tokenizer() first.");',
                      "no vocabulary (tokenizer.ggml.model none/no_vocab): every token call asserts"),
    "tensor_alignment": Guard("ggml/src/ggml-backend.cpp", 2527,
                              'GGML_ASSERT((uintptr_t)ptr % TENSOR_ALIGNMENT == 0 && "buffer pointer must be aligned");',
                              "tensor data not 32-byte aligned in the file (general.alignment 1..16) with mmap"),
    "spm_byte_fallback": Guard("src/llama-vocab.cpp", 4014, "return pimpl->token_to_id.at(buf2);",
                               "SPM vocabulary without a byte token: std::out_of_range escapes llama_tokenize "
                               "(std::terminate); checked per tokenize call by ByteFallbackGuard"),
}

_INT_TYPES = {
    lib.GGUF_TYPE_UINT8: "uint8_t", lib.GGUF_TYPE_INT8: "int8_t", lib.GGUF_TYPE_UINT16: "uint16_t",
    lib.GGUF_TYPE_INT16: "int16_t", lib.GGUF_TYPE_UINT32: "uint32_t", lib.GGUF_TYPE_INT32: "int32_t",
    lib.GGUF_TYPE_UINT64: "uint64_t", lib.GGUF_TYPE_INT64: "int64_t",
}
_FLOAT_TYPES = {lib.GGUF_TYPE_FLOAT32: "float", lib.GGUF_TYPE_FLOAT64: "double"}


class _Meta:
    """Typed reads of one parsed GGUF context. Every getter checks the type first: gguf's own assert on it."""

    def __init__(self, ctx: Any, overrides: Mapping[str, object]) -> None:
        self._ctx = ctx
        self._overrides = overrides

    def _id(self, key: str) -> int:
        return int(lib.gguf_find_key(self._ctx, key.encode()))

    def string(self, key: str) -> str | None:
        if key in self._overrides:
            v = self._overrides[key]
            return v if isinstance(v, str) else None
        i = self._id(key)
        if i < 0 or lib.gguf_get_kv_type(self._ctx, i) != lib.GGUF_TYPE_STRING:
            return None
        return str(ffi.string(lib.gguf_get_val_str(self._ctx, i)).decode("utf-8", "replace"))

    def _scalar(self, i: int, types: Mapping[int, str]) -> float | int | None:
        t = int(lib.gguf_get_kv_type(self._ctx, i))
        if t not in types:
            return None
        value: float | int = ffi.cast(f"{types[t]} *", lib.gguf_get_val_data(self._ctx, i))[0]
        return value

    def integer(self, key: str) -> int | None:
        """An integer scalar, or the largest element of an integer array (``get_key_or_arr`` keys)."""
        if key in self._overrides:
            v = self._overrides[key]
            return int(v) if isinstance(v, int) else None
        i = self._id(key)
        if i < 0:
            return None
        if lib.gguf_get_kv_type(self._ctx, i) == lib.GGUF_TYPE_ARRAY:
            vals = self.int_array(key)
            return max(vals) if vals else None
        v = self._scalar(i, _INT_TYPES)
        return None if v is None else int(v)

    def flag(self, key: str) -> bool | None:
        """A bool scalar (None when absent or of another type)."""
        i = self._id(key)
        if i < 0 or lib.gguf_get_kv_type(self._ctx, i) != lib.GGUF_TYPE_BOOL:
            return None
        return bool(lib.gguf_get_val_bool(self._ctx, i))

    def real(self, key: str) -> float | None:
        if key in self._overrides:
            v = self._overrides[key]
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        i = self._id(key)
        if i < 0:
            return None
        v = self._scalar(i, _FLOAT_TYPES)
        return None if v is None else float(v)

    def int_array(self, key: str) -> list[int] | None:
        i = self._id(key)
        if i < 0 or lib.gguf_get_kv_type(self._ctx, i) != lib.GGUF_TYPE_ARRAY:
            return None
        t = int(lib.gguf_get_arr_type(self._ctx, i))
        if t == lib.GGUF_TYPE_BOOL:  # llama-model-loader.cpp get_arr reads bool arrays as 0/1 integers
            n = int(lib.gguf_get_arr_n(self._ctx, i))
            flags = ffi.cast("int8_t *", lib.gguf_get_arr_data(self._ctx, i))
            return [int(flags[k] != 0) for k in range(n)]
        if t not in _INT_TYPES:
            return None
        n = int(lib.gguf_get_arr_n(self._ctx, i))
        data = ffi.cast(f"{_INT_TYPES[t]} *", lib.gguf_get_arr_data(self._ctx, i))
        return [int(data[k]) for k in range(n)]

    def str_array(self, key: str) -> list[bytes] | None:
        """Elements as llama.cpp sees them: C strings, so cut at the first NUL."""
        i = self._id(key)
        if i < 0 or lib.gguf_get_kv_type(self._ctx, i) != lib.GGUF_TYPE_ARRAY:
            return None
        if lib.gguf_get_arr_type(self._ctx, i) != lib.GGUF_TYPE_STRING:
            return None
        n = int(lib.gguf_get_arr_n(self._ctx, i))
        get, ctx = lib.gguf_get_arr_str, self._ctx
        return [ffi.string(get(ctx, i, k)) for k in range(n)]


def _check_hparams(m: _Meta, arch: str) -> None:
    n_layer = m.integer(f"{arch}.block_count")
    if n_layer is not None and not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise ModelLoadError(f"{arch}.block_count = {n_layer}: must be in [1, {LLAMA_MAX_LAYERS}]")
    n_layer = n_layer or 0
    nextn = m.integer(f"{arch}.nextn_predict_layers")
    if nextn is not None and nextn > n_layer:
        raise ModelLoadError(f"{arch}.nextn_predict_layers = {nextn} exceeds block_count = {n_layer}")
    if arch == "wavtokenizer-dec":
        for part in ("posnet", "convnext"):
            n = m.integer(f"{arch}.{part}.block_count")
            if n is not None and n > n_layer:
                raise ModelLoadError(f"{arch}.{part}.block_count = {n} exceeds block_count = {n_layer}")

    n_expert = m.integer(f"{arch}.expert_count") or 0
    n_used = m.integer(f"{arch}.expert_used_count") or 0
    n_groups = m.integer(f"{arch}.expert_group_count") or 0
    n_group_used = m.integer(f"{arch}.expert_group_used_count") or 0
    if arch in ("hunyuan_vl", "hunyuan-dense") and n_expert <= 1:
        n_expert = n_used = 0  # llama-model.cpp:1337 turns these into dense models
    problem = None
    if not 0 <= n_expert <= LLAMA_MAX_EXPERTS:
        problem = f"expert_count = {n_expert} is outside [0, {LLAMA_MAX_EXPERTS}]"
    elif not 0 <= n_used <= n_expert:
        problem = f"expert_used_count = {n_used} exceeds expert_count = {n_expert}"
    elif n_expert > 0:
        if n_used == 0:
            problem = "expert_count is set but expert_used_count is 0"
        elif not 0 <= n_groups < n_expert:
            problem = f"expert_group_count = {n_groups} must be below expert_count = {n_expert}"
        elif n_groups > 1 and (n_expert % n_groups or not 0 < n_group_used < n_groups):
            problem = (f"expert groups ({n_groups} groups, {n_group_used} used) do not fit "
                       f"expert_count = {n_expert}")
    elif n_groups != 0:
        problem = "expert_group_count is set without experts"
    if problem:
        raise ModelLoadError(f"{arch}: {problem}")

    scaling = m.string(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise ModelLoadError(f"{arch}.rope.scaling.type = {scaling!r}: must be one of {', '.join(ROPE_SCALING_TYPES)}")

    for name in ("layer_norm_epsilon", "layer_norm_rms_epsilon", "group_norm_epsilon"):  # ggml's norm ops
        key = f"{arch}.attention.{name}"
        eps = m.real(key)
        if eps is not None and not eps >= 0.0:  # NaN fails this too
            raise ModelLoadError(f"{key} = {eps}: a normalisation epsilon must be >= 0")


class ByteFallbackGuard:
    """Refuses text a SentencePiece vocabulary without byte tokens cannot spell.

    llama.cpp's SPM tokenizer spells a character that is not a token as byte
    tokens ``<0xXX>`` (or a one-byte token); when neither exists, a C++ exception
    escapes ``llama_tokenize`` and terminates the process. Only vocabularies
    that lack some byte get a guard, so ordinary models pay nothing.
    """

    def __init__(self, missing: frozenset[int], tokens: frozenset[bytes]) -> None:
        self.missing = missing
        self._present = bytes(b for b in range(256) if b not in missing)
        self._tokens = tokens

    def check(self, data: bytes) -> None:
        # SPM sees spaces as "▁" and (usually) a "▁" prefix: check what it will spell.
        spm = b"\xe2\x96\x81" + data.replace(b" ", b"\xe2\x96\x81")
        if not spm.translate(None, self._present):
            return  # every byte has a token: nothing can fail
        for ch in spm.decode("utf-8", "surrogateescape"):
            raw = ch.encode("utf-8", "surrogateescape")
            if raw not in self._tokens and any(b in self.missing for b in raw):
                raise TokenizationError(f"the model's vocabulary has neither a token nor byte tokens for {ch!r}; "
                                        "llama.cpp cannot tokenize this text")


TENSOR_ALIGNMENT = 32  # ggml/src/ggml-impl.h:44


def check_tensor_alignment(ctx: Any) -> None:
    # Mapped in place, a tensor's data must start TENSOR_ALIGNMENT-aligned in the file.
    base = int(lib.gguf_get_data_offset(ctx))
    for t in range(int(lib.gguf_get_n_tensors(ctx))):
        offset = base + int(lib.gguf_get_tensor_offset(ctx, t))
        if offset % TENSOR_ALIGNMENT:
            name = ffi.string(lib.gguf_get_tensor_name(ctx, t)).decode("utf-8", "replace")
            raise ModelLoadError(f"tensor {name!r} starts at file offset {offset}, not {TENSOR_ALIGNMENT}-byte aligned "
                                 "(general.alignment?): it cannot be mapped; load with use_mmap=False")


def _check_vocab(m: _Meta) -> ByteFallbackGuard | None:
    model = m.string("tokenizer.ggml.model")
    if model in ("none", "no_vocab"):
        raise ModelLoadError(f"tokenizer.ggml.model = {model!r}: the model has no vocabulary, "
                             "and llama.cpp aborts on every token operation without one")
    tokens = m.str_array("tokenizer.ggml.tokens")
    if tokens is None:
        return None  # llama.cpp reports a missing or mistyped token list itself
    texts = set(tokens)
    if b"" in texts:  # llama-vocab.cpp:2514 renames empty tokens before indexing them
        tokens = [t or f"[EMPTY_{i}]".encode() for i, t in enumerate(tokens)]
        texts = set(tokens)
    if len(texts) != len(tokens):
        seen: dict[bytes, int] = {}
        for i, text in enumerate(tokens):
            j = seen.setdefault(text, i)
            if j != i:
                raise ModelLoadError(f"tokenizer.ggml.tokens: tokens {j} and {i} are both {text!r}; "
                                     "a vocabulary must not repeat a token")
    if model == "bert":
        types = m.int_array("tokenizer.ggml.token_type")
        if types is not None and TOKEN_TYPE_BYTE in types[: len(tokens)]:
            i = types.index(TOKEN_TYPE_BYTE)
            raise ModelLoadError(f"tokenizer.ggml.model = 'bert' (WordPiece) but token {i} is a byte token, "
                                 "which WordPiece vocabularies do not have (a SentencePiece vocabulary?)")
    if model == "llama":
        missing = frozenset(b for b in range(256)
                            if f"<0x{b:02X}>".encode() not in texts and bytes([b]) not in texts)
        if missing:
            return ByteFallbackGuard(missing, frozenset(texts))
    return None


def check_model_file(path: str | os.PathLike[str], *, vocab_only: bool = False, mapped: bool = True,
                     overrides: Mapping[str, object] | None = None) -> ByteFallbackGuard | None:
    """Raise ModelLoadError where llama.cpp would assert while loading (or first running) ``path``.

    ``overrides`` are the ``kv_overrides`` the model is loaded with (they replace
    file values); ``mapped`` says whether the weights may be memory-mapped. Files llama.cpp's GGUF parser refuses are refused here too.
    Everything else is left to llama.cpp's own validation. Returns the guard
    that tokenization of this model needs (None for almost every model).
    """
    try:
        st = os.stat(path)
        key: tuple[object, ...] | None = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                          vocab_only, mapped, repr(sorted((overrides or {}).items())))
    except OSError:
        key = None
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    guard = _check(path, vocab_only, mapped, overrides)
    if key is not None:
        with _CACHE_LOCK:
            if len(_CACHE) >= 32:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = guard
    return guard


# Files that passed, by identity: reloading a model (a server, a test loop) reads its metadata once.
_CACHE: dict[object, ByteFallbackGuard | None] = {}
_CACHE_LOCK = threading.Lock()


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """llama.cpp's parse of a GGUF file's metadata (``gguf_init_from_file``, no tensor data read): a
    ``gguf_context *`` the caller frees with ``gguf_free``, or NULL where the parser refuses the file."""
    params = ffi.new("struct gguf_init_params *")
    params.no_alloc = True
    params.ctx = ffi.NULL
    return lib.gguf_init_from_file(os.fsencode(path), params[0])


@contextlib.contextmanager
def checked_gguf(path: str | os.PathLike[str]) -> Iterator[Any]:
    """:func:`open_gguf`, freed on exit; a file the parser refuses, or a check failing inside, is a
    ModelLoadError naming the file."""
    ctx = open_gguf(path)
    if ctx == ffi.NULL:
        raise ModelLoadError(f"{os.fspath(path)} is not a valid GGUF file (llama.cpp's GGUF parser refused it; "
                             "enable logging for 'pyllama.llama' for its reason)")
    try:
        yield ctx
    except ModelLoadError as exc:
        raise ModelLoadError(f"{os.fspath(path)}: {exc}") from None
    finally:
        lib.gguf_free(ctx)


def _check(path: str | os.PathLike[str], vocab_only: bool, mapped: bool,
           overrides: Mapping[str, object] | None) -> ByteFallbackGuard | None:
    with checked_gguf(path) as ctx:
        m = _Meta(ctx, overrides or {})
        arch = m.string("general.architecture")
        if arch is not None and not vocab_only and arch != "clip":  # llama-model.cpp:1317 skips hparams there
            _check_hparams(m, arch)
        if mapped and not vocab_only:
            check_tensor_alignment(ctx)
        return _check_vocab(m)


def header_facts(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What a model's header says (architecture, name, file type, sizes, where the data starts), read by
    llama.cpp's GGUF parser from a file that may hold only the header; None when the header is incomplete
    or not GGUF (the caller reads more)."""
    ctx = open_gguf(path)
    if ctx == ffi.NULL:
        return None
    try:
        m = _Meta(ctx, {})
        arch = m.string("general.architecture") or ""
        facts: dict[str, Any] = {"data_offset": int(lib.gguf_get_data_offset(ctx)),
                                 "n_tensors": int(lib.gguf_get_n_tensors(ctx)), "architecture": arch,
                                 "name": m.string("general.name"), "file_type": m.integer("general.file_type")}
        for key in ("context_length", "block_count", "embedding_length", "attention.head_count",
                    "attention.head_count_kv"):
            facts[key] = m.integer(f"{arch}.{key}")
        tokens = m.str_array("tokenizer.ggml.tokens")
        facts["n_vocab"] = len(tokens) if tokens is not None else None
        return facts
    finally:
        lib.gguf_free(ctx)


__all__ = ["header_facts", "check_model_file", "checked_gguf", "open_gguf", "check_tensor_alignment", "ByteFallbackGuard", "Guard", "GUARDS", "LLAMA_MAX_LAYERS", "LLAMA_MAX_EXPERTS"]
