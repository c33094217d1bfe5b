"""Tokens: tokenization into numpy arrays, detokenization, special tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Sized, TypeVar

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from .context_params import default_threads
from .errors import ClosedError, TokenizationError

if TYPE_CHECKING:
    from .gguf_check import ByteFallbackGuard
    from .model import Model

TokenArray = npt.NDArray[np.int32]
T = TypeVar("T", bound=Sized)
_MAX_TEXT_BYTES = 2**31 - 3  # room for BOS and EOS in an int32 token count

# Below this many bytes per thread a thread pool costs more than it saves.
_PARALLEL_MIN_BYTES = 16384
# Texts longer than this are tokenized in pieces of about _LONG_PIECE bytes (see _tokenize_long).
_LONG_TEXT = 65536
_LONG_PIECE = 16384


def as_tokens(tokens: Iterable[int] | npt.ArrayLike) -> TokenArray:
    """A C-contiguous int32 array of token ids (no copy when it already is one).

    Anything but integers in int32's range is refused: a cast would silently turn
    ``1.5`` into token 1 and ``2**32`` into token 0.
    """
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.int32:
        arr = np.ascontiguousarray(tokens)
    else:
        try:
            src = np.asarray(tokens)
        except OverflowError:  # an int past int64 in a list
            raise TokenizationError("a token id does not fit a 32-bit token id") from None
        if src.size and src.dtype.kind == "O" and all(isinstance(t, int) for t in src.ravel()):
            raise TokenizationError("a token id does not fit a 32-bit token id")  # ints mixed past uint64
        if src.size and src.dtype.kind not in "iu":
            raise TokenizationError(f"token ids must be integers, not {src.dtype} values")
        if src.size and src.dtype.itemsize >= 4 and src.dtype != np.int32:
            lo, hi = int(src.min()), int(src.max())
            if lo < -(2**31) or hi >= 2**31:
                raise TokenizationError(f"token id {lo if lo < -(2**31) else hi} does not fit a 32-bit token id")
        arr = np.ascontiguousarray(src, dtype=np.int32)
    if arr.ndim != 1:
        raise TokenizationError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
    return arr


class Vocab:
    """The vocabulary of a loaded model. Obtained as ``model.vocab``; valid while the model is open."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._vp = lib.llama_model_get_vocab(model._p())
        self.n_tokens: int = lib.llama_vocab_n_tokens(self._vp)
        self._add_space_prefix: bool | None = None
        self._cut_exact: dict[bool, bool] = {}
        self._byte_guard: ByteFallbackGuard | None = None  # set by Model for SPM vocabularies lacking bytes
        self._eog: npt.NDArray[np.intp] | None = None
        self._max_piece: int | None = None

    def _v(self) -> Any:
        self._model._p()  # raises ClosedError once the model is closed
        return self._vp

    # --- special tokens ------------------------------------------------------
    def _special(self, fn: Any) -> int | None:
        tok = int(fn(self._v()))
        return None if tok == lib.LLAMA_TOKEN_NULL else tok

    @property
    def bos(self) -> int | None:
        return self._special(lib.llama_vocab_bos)

    @property
    def eos(self) -> int | None:
        return self._special(lib.llama_vocab_eos)

    @property
    def eot(self) -> int | None:
        return self._special(lib.llama_vocab_eot)

    @property
    def sep(self) -> int | None:
        return self._special(lib.llama_vocab_sep)

    @property
    def pad(self) -> int | None:
        return self._special(lib.llama_vocab_pad)

    @property
    def nl(self) -> int | None:
        return self._special(lib.llama_vocab_nl)

    @property
    def mask(self) -> int | None:
        return self._special(lib.llama_vocab_mask)

    @property
    def fim_pre(self) -> int | None:
        return self._special(lib.llama_vocab_fim_pre)

    @property
    def fim_suf(self) -> int | None:
        return self._special(lib.llama_vocab_fim_suf)

    @property
    def fim_mid(self) -> int | None:
        return self._special(lib.llama_vocab_fim_mid)

    @property
    def fim_pad(self) -> int | None:
        return self._special(lib.llama_vocab_fim_pad)

    @property
    def fim_rep(self) -> int | None:
        return self._special(lib.llama_vocab_fim_rep)

    @property
    def fim_sep(self) -> int | None:
        return self._special(lib.llama_vocab_fim_sep)

    @property
    def add_bos(self) -> bool:
        return bool(lib.llama_vocab_get_add_bos(self._v()))

    @property
    def add_eos(self) -> bool:
        return bool(lib.llama_vocab_get_add_eos(self._v()))

    @property
    def add_sep(self) -> bool:
        return bool(lib.llama_vocab_get_add_sep(self._v()))

    @property
    def type(self) -> str:
        names = {1: "spm", 2: "bpe", 3: "wpm", 4: "ugm", 5: "rwkv", 6: "plamo2"}
        return names.get(int(lib.llama_vocab_type(self._v())), "none")

    def _check(self, token: int) -> int:
        token = int(token)
        if not 0 <= token < self.n_tokens:
            raise TokenizationError(f"token id {token} is outside the vocabulary [0, {self.n_tokens})")
        return token

    def check_tokens(self, tokens: TokenArray) -> None:
        """Raise TokenizationError unless every id is inside the vocabulary (vectorised)."""
        if not tokens.size:
            return
        if tokens.dtype != np.int32 or not tokens.flags.c_contiguous:
            tokens = as_tokens(tokens)
        i = lib.pyllama_first_bad_token(ffi.from_buffer("llama_token[]", tokens), tokens.size, self.n_tokens)
        if i >= 0:
            raise TokenizationError(f"token id {int(tokens[i])} is outside the vocabulary [0, {self.n_tokens})")

    def eog_tokens(self) -> npt.NDArray[np.intp]:
        """Every end-of-generation token id, ascending (computed once: a pass over the vocabulary)."""
        if self._eog is None:
            vp, is_eog = self._v(), lib.llama_vocab_is_eog
            self._eog = np.array([t for t in range(self.n_tokens) if is_eog(vp, t)], dtype=np.intp)
        return self._eog

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (eos, eot, and the model's other stop tokens)."""
        return bool(lib.llama_vocab_is_eog(self._v(), self._check(token)))

    def is_control(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_control(self._v(), self._check(token)))

    def attr(self, token: int) -> int:
        """The token's ``LLAMA_TOKEN_ATTR_*`` bit set."""
        return int(lib.llama_vocab_get_attr(self._v(), self._check(token)))

    def text(self, token: int) -> str:
        """The token's raw text in the vocabulary (e.g. ``▁the``, ``<0x0A>``)."""
        return str(ffi.string(lib.llama_vocab_get_text(self._v(), self._check(token))).decode("utf-8", "replace"))

    def score(self, token: int) -> float:
        return float(lib.llama_vocab_get_score(self._v(), self._check(token)))

    # --- text <-> tokens ---------------------------------------------------------
    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> TokenArray:
        """Tokenize into an int32 array that llama_tokenize writes in place.

        ``add_special`` adds BOS/EOS as the model asks; ``parse_special`` treats
        special-token text such as ``<|im_start|>`` as the special token.
        """
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        vp = self._v()
        if len(data) > _MAX_TEXT_BYTES:  # llama_tokenize takes int32 lengths
            raise TokenizationError(f"text of {len(data)} bytes is too long to tokenize (at most {_MAX_TEXT_BYTES})")
        if self._byte_guard is not None:
            self._byte_guard.check(data)
        if len(data) > _LONG_TEXT and self._newline_cuts_exact(parse_special):
            return self._tokenize_long(data, add_special, parse_special)
        return self._one_call(vp, data, add_special, parse_special)

    @staticmethod
    def _one_call(vp: Any, data: bytes, add_special: bool, parse_special: bool) -> TokenArray:
        """One ``llama_tokenize`` of checked bytes."""
        # A token covers at least one byte, plus BOS/EOS: one call suffices almost always.
        out = np.empty(len(data) + 2, dtype=np.int32)
        n = lib.llama_tokenize(vp, data, len(data), ffi.from_buffer("llama_token[]", out), out.size,
                               add_special, parse_special)
        if n < 0:
            if n == np.iinfo(np.int32).min:
                raise TokenizationError("text too long to tokenize (token count overflows int32)")
            out = np.empty(-n, dtype=np.int32)
            n = lib.llama_tokenize(vp, data, len(data), ffi.from_buffer("llama_token[]", out), out.size,
                                   add_special, parse_special)
            if n < 0:
                raise TokenizationError(f"llama_tokenize failed ({n})")
        return out[:n]

    # --- long texts --------------------------------------------------------------------------------
    # llama_tokenize first splits the text at every occurrence of a special token
    # (tokenizer_st_partition in llama-vocab.cpp). For each match it recomputes the
    # fragment's position in a std::forward_list from the list's head, so a text with
    # k matches costs O(k^2) there. Vocabularies with "\n" among their user-defined
    # tokens (Gemma 3's has 165, "\n" and "\n\n" among them) match at every line: a
    # 1 MB text then tokenizes slower per byte than a 10 KB one. The partition's
    # matches are the same in a piece of the text as in the whole text wherever no
    # special token can span the cut, and a cut where a newline run starts is a
    # fragment boundary in both, so pieces cut there tokenize to exactly the ids of
    # the whole (see _newline_cuts_exact for when that holds).

    def _newline_cuts_exact(self, parse_special: bool) -> bool:
        """Whether cutting a text where a newline run starts leaves its tokens unchanged.

        True when "\n" is one of the special tokens the partition uses and every such
        token that contains a newline is made of newlines only (so none spans the cut).
        """
        cached = self._cut_exact.get(parse_special)
        if cached is None:
            cached = self._cut_exact[parse_special] = self._compute_cut_exact(parse_special)
        return cached

    def _compute_cut_exact(self, parse_special: bool) -> bool:
        if self.type not in ("spm", "bpe") or self._model.meta("tokenizer.ggml.model") not in ("llama", "gpt2"):
            return False
        vp = self._v()
        mask = int(lib.LLAMA_TOKEN_ATTR_USER_DEFINED)
        if parse_special:
            mask |= int(lib.LLAMA_TOKEN_ATTR_CONTROL) | int(lib.LLAMA_TOKEN_ATTR_UNKNOWN)
        get_attr, get_text = lib.llama_vocab_get_attr, lib.llama_vocab_get_text
        newline_tokens = [text for text in (ffi.string(get_text(vp, t)) for t in range(self.n_tokens)
                                            if get_attr(vp, t) & mask) if b"\n" in text]
        return b"\n" in newline_tokens and all(set(t) == {0x0A} for t in newline_tokens)

    def _tokenize_long(self, data: bytes, add_special: bool, parse_special: bool) -> TokenArray:
        cuts = [0]
        pos = _LONG_PIECE
        n = len(data)
        while pos < n:
            s = data.find(b"\n", pos)
            while s > 0 and data[s - 1] == 0x0A:  # inside a newline run: go to the next run's start
                e = s
                while e < n and data[e] == 0x0A:
                    e += 1
                s = data.find(b"\n", e)
            if s <= 0:
                break
            cuts.append(s)
            pos = s + _LONG_PIECE
        cuts.append(n)
        pieces = [data[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
        vp = self._vp  # the text was checked whole: the pieces go straight to llama_tokenize
        parts = _map_in_threads(lambda piece: self._one_call(vp, piece, False, parse_special), pieces, None)
        if add_special and self.add_bos and self.bos is not None:
            parts.insert(0, np.array([self.bos], dtype=np.int32))
        if add_special and self.add_eos and self.eos is not None:
            parts.append(np.array([self.eos], dtype=np.int32))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)

    def tokenize_many(self, texts: Sequence[str | bytes], *, add_special: bool = True,
                      parse_special: bool = False, n_threads: int | None = None) -> list[TokenArray]:
        """Tokenize several texts across threads (the GIL is released inside ``llama_tokenize``).

        Results are in order and identical to tokenizing each text alone.
        ``n_threads`` defaults to the context default (:func:`pyllama.context_params.thread_choice`);
        small batches run on the calling thread, where a pool would cost more than it saves.
        """
        items = list(texts)
        return _map_in_threads(lambda text: self.tokenize(text, add_special=add_special, parse_special=parse_special),
                               items, n_threads)

    def min_tokens(self, text: str | bytes) -> int:
        """A lower bound on the tokens ``text`` makes, known without tokenizing it: each token covers at
        most the longest piece of the vocabulary (0 where the tokenizer may drop text: WordPiece and
        Unigram collapse whitespace). So a prompt that cannot fit a context is refused before the seconds
        tokenizing megabytes takes."""
        if self.type not in ("bpe", "spm") or not text:
            return 0
        if self._max_piece is None:  # once per model (tens of ms for 256k tokens)
            buf = ffi.new("char[]", 256)
            self._max_piece = max(1, max(len(self._piece(t, True, 0, buf)) for t in range(self.n_tokens)))
        return -(-len(text) // self._max_piece)  # a character is at least a byte

    def token_to_piece(self, token: int, *, special: bool = False, lstrip: int = 0) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        return self._piece(self._check(token), special, lstrip, ffi.new("char[]", 256))

    def _piece(self, token: int, special: bool, lstrip: int, buf: Any) -> bytes:
        # ``buf`` is a char[256] owned by the caller, so threads streaming on one model never
        # share a scratch buffer. Two scalar checks per token: llama.cpp throws std::out_of_range
        # through its C API for an id outside the vocabulary (std::terminate), and the vocabulary
        # pointer dangles once the model is closed (StreamDecoder is public).
        if not 0 <= token < self.n_tokens:
            raise TokenizationError(f"token id {token} is outside the vocabulary [0, {self.n_tokens})")
        if self._model._ptr is None:
            raise ClosedError("this model is closed")
        n = lib.llama_token_to_piece(self._vp, token, buf, 256, lstrip, special)
        if n < 0:
            big = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self._vp, token, big, -n, lstrip, special)
            return bytes(ffi.buffer(big, n))
        return bytes(ffi.buffer(buf, n))

    def detokenize(self, tokens: Iterable[int] | npt.ArrayLike, *, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        """Text of a token sequence, exactly as llama.cpp's llama_detokenize renders it."""
        return self.detokenize_bytes(tokens, remove_special=remove_special,
                                     unparse_special=unparse_special).decode("utf-8", "replace")

    def detokenize_bytes(self, tokens: Iterable[int] | npt.ArrayLike, *, remove_special: bool = False,
                         unparse_special: bool = False) -> bytes:
        arr = as_tokens(tokens)
        self.check_tokens(arr)
        vp = self._v()
        if arr.size > 2**31 - 1:  # llama_detokenize takes int32 counts
            raise TokenizationError(f"{arr.size} tokens are too many to detokenize at once")
        ptr = ffi.from_buffer("llama_token[]", arr)
        cap = min(max(64, arr.size * 8), 2**31 - 1)
        buf = ffi.new("char[]", cap)
        n = lib.llama_detokenize(vp, ptr, arr.size, buf, cap, remove_special, unparse_special)
        if n < 0:
            cap = -n
            buf = ffi.new("char[]", cap)
            n = lib.llama_detokenize(vp, ptr, arr.size, buf, cap, remove_special, unparse_special)
            if n < 0:
                raise TokenizationError(f"llama_detokenize failed ({n})")
        return bytes(ffi.buffer(buf, n))

    @property
    def add_space_prefix(self) -> bool:
        """Whether detokenization strips the space the tokenizer prefixed (SentencePiece style)."""
        if self._add_space_prefix is None:
            toks = self.tokenize("a", add_special=False)
            self._add_space_prefix = bool(toks.size) and self._piece(int(toks[0]), False, 0, ffi.new("char[]", 256)).startswith(b" ")
        return self._add_space_prefix




def _map_in_threads(fn: Callable[[T], TokenArray], items: list[T], n_threads: int | None) -> list[TokenArray]:
    """``[fn(x) for x in items]`` in order, over contiguous shares of similar byte counts in a thread
    pool (fn releases the GIL inside llama_tokenize); small batches stay on the calling thread."""
    if n_threads is None:
        n_threads = default_threads()
    if n_threads < 1:
        raise ValueError("n_threads must be >= 1")
    sizes = [len(x) for x in items]
    total = sum(sizes)
    n = min(n_threads, len(items), max(1, total // _PARALLEL_MIN_BYTES))
    if n <= 1:
        return [fn(x) for x in items]
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, total, n + 1)[1:-1])
    shares = np.split(np.arange(len(items)), bounds)

    def run(idx: npt.NDArray[np.intp]) -> list[TokenArray]:
        return [fn(items[i]) for i in idx]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="pyllama-tokenize") as pool:
        return [arr for part in pool.map(run, shares) for arr in part]

__all__ = ["Vocab", "TokenArray", "as_tokens"]
