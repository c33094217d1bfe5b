"""The sampler specs: llama.cpp's built-in samplers, described by frozen dataclasses.

A spec holds a sampler's parameters and makes the native sampler for a model
(``_create``); :class:`~pyllama.SamplerChain` (:mod:`pyllama.sampling`) builds a chain
from a list of them::

    [TopK(40), TopP(0.95), Temp(0.8), Dist(seed=1)]

Specs that select the token (may end a chain): Greedy, Dist, Mirostat,
MirostatV2 and AdaptiveP. :func:`default_chain` gives llama.cpp's usual chain.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from ._ffi import ffi, lib
from .errors import SamplerError

if TYPE_CHECKING:
    from .model import Model

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert TOKEN_DATA.itemsize == ffi.sizeof("llama_token_data")


class Sampler:
    """Base of the sampler specs: ``_create`` makes the native sampler for a model."""

    selects: ClassVar[bool] = False  # True when it picks the token (may end a chain)
    needs_model: ClassVar[bool] = False

    def _create(self, model: Model | None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _ptr(p: Any, what: str) -> Any:
    if p == ffi.NULL:
        raise SamplerError(f"llama.cpp could not create the {what} sampler (invalid parameters?)")
    return p


def _vocab(model: Model | None, what: str) -> Any:
    if model is None:
        raise SamplerError(f"the {what} sampler needs the model: build the chain with SamplerChain(specs, model)")
    return model.vocab._v()


@dataclass(frozen=True)
class Greedy(Sampler):
    """Pick the most likely token."""

    selects: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_greedy(), "greedy")


@dataclass(frozen=True)
class Dist(Sampler):
    """Draw from the distribution (seeded; ``DEFAULT_SEED`` draws a random seed)."""

    seed: int = DEFAULT_SEED
    selects: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_dist(self.seed & 0xFFFFFFFF), "dist")


@dataclass(frozen=True)
class TopK(Sampler):
    k: int

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_top_k(self.k), "top-k")


@dataclass(frozen=True)
class TopP(Sampler):
    p: float
    min_keep: int = 1

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_top_p(self.p, self.min_keep), "top-p")


@dataclass(frozen=True)
class MinP(Sampler):
    p: float
    min_keep: int = 1

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_min_p(self.p, self.min_keep), "min-p")


@dataclass(frozen=True)
class Typical(Sampler):
    p: float
    min_keep: int = 1

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_typical(self.p, self.min_keep), "typical")


@dataclass(frozen=True)
class Temp(Sampler):
    """Temperature; ``t <= 0`` keeps only the most likely token."""

    t: float

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_temp(self.t), "temperature")


@dataclass(frozen=True)
class TempExt(Sampler):
    """Dynamic (entropy-based) temperature."""

    t: float
    delta: float
    exponent: float = 1.0

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_temp_ext(self.t, self.delta, self.exponent), "extended temperature")


@dataclass(frozen=True)
class XTC(Sampler):
    """Exclude Top Choices."""

    p: float
    t: float
    min_keep: int = 1
    seed: int = DEFAULT_SEED

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_xtc(self.p, self.t, self.min_keep, self.seed & 0xFFFFFFFF), "XTC")


@dataclass(frozen=True)
class TopNSigma(Sampler):
    n: float

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_top_n_sigma(self.n), "top-n-sigma")


@dataclass(frozen=True)
class Mirostat(Sampler):
    """Mirostat v1 (selects the token)."""

    seed: int = DEFAULT_SEED
    tau: float = 5.0
    eta: float = 0.1
    m: int = 100
    selects: ClassVar[bool] = True
    needs_model: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        _vocab(model, "mirostat")
        assert model is not None
        return _ptr(lib.llama_sampler_init_mirostat(model.vocab.n_tokens, self.seed & 0xFFFFFFFF,
                                                    self.tau, self.eta, self.m), "mirostat")


@dataclass(frozen=True)
class MirostatV2(Sampler):
    seed: int = DEFAULT_SEED
    tau: float = 5.0
    eta: float = 0.1
    selects: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_mirostat_v2(self.seed & 0xFFFFFFFF, self.tau, self.eta), "mirostat v2")


@dataclass(frozen=True)
class AdaptiveP(Sampler):
    """Adaptive-p sampling (selects the token)."""

    target: float
    decay: float
    seed: int = DEFAULT_SEED
    selects: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_adaptive_p(self.target, self.decay, self.seed & 0xFFFFFFFF), "adaptive-p")


#: most parse stacks a grammar may keep open at one step: checked before it is built
#: (:func:`pyllama.grammar.check_gbnf`, which explains the cost) and at every token (:attr:`Grammar.max_stacks`)
GRAMMAR_MAX_STACKS = 256


@dataclass(frozen=True)
class Grammar(Sampler):
    """Constrain output to a GBNF grammar. With ``trigger_patterns``/``trigger_tokens`` it is lazy:
    unconstrained until a trigger appears."""

    grammar: str
    root: str = "root"
    trigger_patterns: Sequence[str] = ()
    trigger_tokens: Sequence[int] = ()
    #: the most parses llama.cpp's grammar engine may follow at once: an ambiguous grammar multiplies them
    #: with each character (some double them), making every token slower without end; past this bound
    #: accepting or sampling a token raises SamplerError (the request ends) instead of hanging
    max_stacks: int = GRAMMAR_MAX_STACKS
    needs_model: ClassVar[bool] = True

    def check(self, model: Model) -> None:
        """Build the native sampler once and free it: raises what building a chain with it would raise.

        Its bound (:func:`pyllama.grammar.check_gbnf`) and its pass over the vocabulary are remembered, so
        a chain built with it next (on a server's event loop, say) only pays llama.cpp's parse: run this
        where a slow grammar delays nobody else.
        """
        lib.llama_sampler_free(self._create(model))

    def _create(self, model: Model | None) -> Any:
        vp = _vocab(model, "grammar")
        _check_gbnf(self.grammar)
        for pat in self.trigger_patterns:
            _check_trigger_pattern(pat)
        if not 1 <= self.max_stacks <= 1 << 20:
            raise ValueError(f"max_stacks must be in [1, {1 << 20}], not {self.max_stacks}")
        lazy = bool(self.trigger_patterns or self.trigger_tokens)
        pats = [ffi.new("char[]", s.encode()) for s in self.trigger_patterns]
        parr = ffi.new("const char *[]", pats or [ffi.NULL])
        toks = np.asarray(self.trigger_tokens, dtype=np.int32)
        # llama.cpp's grammar engine behind pyllama's bound on its parse stacks (src/native/grammar.cpp)
        p = lib.pyllama_sampler_init_grammar(vp, self.grammar.encode(), self.root.encode(), lazy, parr, len(pats),
                                             ffi.from_buffer("llama_token[]", toks), toks.size, self.max_stacks)
        if not lazy and p != ffi.NULL and not _allows_any_token(p, vp, model, self.grammar, self.root):
            lib.llama_sampler_free(p)
            # Sampling would pick a token the grammar refuses, and accepting it throws through
            # llama.cpp's C API (std::terminate).
            raise SamplerError("the grammar allows no token to start with (an empty character class, "
                               "a token reference outside the vocabulary?)")
        return _ptr(p, "grammar (GBNF parse error? see the 'pyllama.llama' log)")


# What std::regex (ECMAScript), which compiles trigger patterns, throws on though Python's re accepts it.
_NOT_ECMASCRIPT = re.compile(r"\(\?(?![:=!])|\\[AZz]|\{,|(?<!\\)[*+?}][+]")


# Grammars known to allow a first token, per model: the check costs one grammar pass over the
# vocabulary (on 262k tokens: 60 ms for a tool's JSON schema, 0.8 s for an enum of 256 values), which
# a server repeating one schema pays once. The most recently used are kept: a server that saw more
# distinct grammars still remembers the ones it is sent now.
_GRAMMARS_OK: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], None]] = weakref.WeakKeyDictionary()
_GRAMMARS_LOCK = threading.Lock()
_GRAMMARS_KEPT = 256


def _allows_any_token(smpl: Any, vp: Any, model: Any, grammar: str, root: str) -> bool:
    """Whether a grammar sampler leaves any token of the vocabulary possible (applied once, at creation)."""
    key = (grammar, root)
    with _GRAMMARS_LOCK:
        known = _GRAMMARS_OK.setdefault(model, {})
        if key in known:
            known[key] = known.pop(key)  # now the most recent
            return True
    n = int(lib.llama_vocab_n_tokens(vp))
    cand = np.zeros(n, dtype=TOKEN_DATA)
    cand["id"] = np.arange(n, dtype=np.int32)
    arr = ffi.new("llama_token_data_array *")
    arr.data = ffi.cast("llama_token_data *", ffi.from_buffer(cand))
    arr.size, arr.selected, arr.sorted = n, -1, False
    lib.llama_sampler_apply(smpl, arr)
    ok = bool(np.isfinite(cand["logit"]).any())
    if ok:
        with _GRAMMARS_LOCK:
            known[key] = None
            if len(known) > _GRAMMARS_KEPT:
                del known[next(iter(known))]
    return ok


def _check_gbnf(text: str) -> None:
    # What llama-grammar.cpp cannot survive (nesting that overflows its stack, a repetition {m,n} with
    # n < m that it loops on for ever) and what would take it seconds to hours, found from the text.
    from .grammar import check_gbnf

    check_gbnf(text)


def _check_trigger_pattern(pattern: str) -> None:
    # std::regex throws std::regex_error through llama.cpp's C API (std::terminate) on a bad pattern.
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SamplerError(f"trigger pattern {pattern!r} is not a valid regular expression: {exc}") from None
    bad = _NOT_ECMASCRIPT.search(pattern)
    if bad is not None:
        raise SamplerError(f"trigger pattern {pattern!r}: {bad.group()!r} is not ECMAScript regex syntax "
                           "(llama.cpp compiles trigger patterns with std::regex)")


@dataclass(frozen=True)
class Penalties(Sampler):
    """Repetition, frequency and presence penalties over the last ``last_n`` tokens."""

    last_n: int = 64
    repeat: float = 1.0
    frequency: float = 0.0
    presence: float = 0.0
    needs_model: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        _vocab(model, "penalties")
        assert model is not None
        return _ptr(lib.llama_sampler_init_penalties(model.vocab.n_tokens, self.last_n, self.repeat,
                                                     self.frequency, self.presence), "penalties")


@dataclass(frozen=True)
class DRY(Sampler):
    """DRY ("don't repeat yourself") repetition penalty."""

    multiplier: float = 0.8
    base: float = 1.75
    allowed_length: int = 2
    penalty_last_n: int = -1
    sequence_breakers: Sequence[str] = ("\n", ":", '"', "*")
    needs_model: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        vp = _vocab(model, "DRY")
        items = [ffi.new("char[]", s.encode()) for s in self.sequence_breakers]
        arr = ffi.new("const char *[]", items or [ffi.NULL])
        return _ptr(lib.llama_sampler_init_dry(vp, self.multiplier, self.base, self.allowed_length,
                                               self.penalty_last_n, arr, len(items)), "DRY")


@dataclass(frozen=True)
class LogitBias(Sampler):
    """Add a bias to chosen tokens' logits (``-inf`` bans a token)."""

    bias: Mapping[int, float] = field(default_factory=dict)
    needs_model: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        _vocab(model, "logit-bias")
        assert model is not None
        n_vocab = model.vocab.n_tokens
        arr = ffi.new("llama_logit_bias[]", max(1, len(self.bias)))
        for i, (tok, b) in enumerate(self.bias.items()):
            if not 0 <= int(tok) < n_vocab:
                raise SamplerError(f"logit bias for token {tok} outside the vocabulary [0, {n_vocab})")
            arr[i].token = int(tok)
            arr[i].bias = float(b)
        return _ptr(lib.llama_sampler_init_logit_bias(n_vocab, len(self.bias), arr), "logit-bias")


@dataclass(frozen=True)
class Infill(Sampler):
    """Fill-in-the-middle helper sampler (for FIM-trained models)."""

    needs_model: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        return _ptr(lib.llama_sampler_init_infill(_vocab(model, "infill")), "infill")


def greedy() -> list[Sampler]:
    return [Greedy()]


def default_chain(*, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                  seed: int = DEFAULT_SEED) -> list[Sampler]:
    """llama.cpp's usual chain; ``temperature <= 0`` gives greedy decoding."""
    if temperature <= 0:
        return [Greedy()]
    return [TopK(top_k), TopP(top_p), MinP(min_p), Temp(temperature), Dist(seed)]


__all__ = [
    "Sampler", "TOKEN_DATA", "DEFAULT_SEED",
    "Greedy", "Dist", "TopK", "TopP", "MinP", "Typical", "Temp", "TempExt", "XTC", "TopNSigma",
    "Mirostat", "MirostatV2", "AdaptiveP", "Grammar", "Penalties", "DRY", "LogitBias", "Infill",
    "greedy", "default_chain",
]
