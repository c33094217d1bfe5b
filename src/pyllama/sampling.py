"""Sampling: chains of llama.cpp's samplers and samplers written in Python.

A chain is described by a list of sampler specs and built against a model::

    chain = pyllama.SamplerChain([TopK(40), TopP(0.95), Temp(0.8), Dist(seed=1)], model)
    token = chain.sample(ctx)            # sample from the last logits, and accept

The last sampler must select a token (Greedy, Dist, Mirostat, MirostatV2,
AdaptiveP, or a custom sampler with ``selects = True``): llama.cpp would abort
on a chain that leaves no selection, so pyllama refuses to build one.
"""

from __future__ import annotations

import copy
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from ._handle import Handle
from .errors import SamplerError, TokenizationError

if TYPE_CHECKING:
    from .context import Context
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


@dataclass(frozen=True)
class Grammar(Sampler):
    """Constrain output to a GBNF grammar. With ``trigger_patterns``/``trigger_tokens`` it is lazy:
    unconstrained until a trigger appears."""

    grammar: str
    root: str = "root"
    trigger_patterns: Sequence[str] = ()
    trigger_tokens: Sequence[int] = ()
    needs_model: ClassVar[bool] = True

    def _create(self, model: Model | None) -> Any:
        vp = _vocab(model, "grammar")
        _check_gbnf(self.grammar)
        for pat in self.trigger_patterns:
            _check_trigger_pattern(pat)
        if not self.trigger_patterns and not self.trigger_tokens:
            p = lib.llama_sampler_init_grammar(vp, self.grammar.encode(), self.root.encode())
            if p != ffi.NULL and not _allows_any_token(p, vp, model, self.grammar, self.root):
                lib.llama_sampler_free(p)
                # Sampling would pick a token the grammar refuses, and accepting it throws through
                # llama.cpp's C API (std::terminate).
                raise SamplerError("the grammar allows no token to start with (an empty character class, "
                                   "a token reference outside the vocabulary?)")
        else:
            pats = [ffi.new("char[]", s.encode()) for s in self.trigger_patterns]
            parr = ffi.new("const char *[]", pats or [ffi.NULL])
            toks = np.asarray(self.trigger_tokens, dtype=np.int32)
            p = lib.llama_sampler_init_grammar_lazy_patterns(
                vp, self.grammar.encode(), self.root.encode(), parr, len(pats),
                ffi.from_buffer("llama_token[]", toks), toks.size)
        return _ptr(p, "grammar (GBNF parse error? see the 'pyllama.llama' log)")


# llama-grammar.cpp parses nested groups recursively (about 20,000 levels overflow an 8 MiB
# stack: SIGSEGV) and loops for ever on a repetition {m,n} with n < m. It reports every other
# error itself. Strings, character classes and comments are skipped; what is left is checked.
_GBNF_MAX_NESTING = 1000
_GBNF_SCAN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[(){]')
_GBNF_REPEAT = re.compile(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}")
# What std::regex (ECMAScript), which compiles trigger patterns, throws on though Python's re accepts it.
_NOT_ECMASCRIPT = re.compile(r"\(\?(?![:=!])|\\[AZz]|\{,|(?<!\\)[*+?}][+]")


# Grammars known to allow a first token, per model: the check costs one grammar pass over the
# vocabulary (tens of ms for 262k tokens), which a server repeating one schema pays once.
_GRAMMARS_OK: weakref.WeakKeyDictionary[Any, set[tuple[str, str]]] = weakref.WeakKeyDictionary()
_GRAMMARS_LOCK = threading.Lock()


def _allows_any_token(smpl: Any, vp: Any, model: Any, grammar: str, root: str) -> bool:
    """Whether a grammar sampler leaves any token of the vocabulary possible (applied once, at creation)."""
    with _GRAMMARS_LOCK:
        known = _GRAMMARS_OK.setdefault(model, set())
        if (grammar, root) in known:
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
            if len(known) < 256:
                known.add((grammar, root))
    return ok


def _check_gbnf(text: str) -> None:
    depth = 0
    for m in _GBNF_SCAN.finditer(text):
        c = m.group()
        if c == "(":
            depth += 1
            if depth > _GBNF_MAX_NESTING:
                raise SamplerError(f"grammar nests groups deeper than {_GBNF_MAX_NESTING} levels")
        elif c == ")":
            depth -= 1
        elif c == "{":
            rep = _GBNF_REPEAT.match(text, m.start())
            if rep is not None and int(rep.group(2)) < int(rep.group(1)):
                raise SamplerError(f"grammar repetition {rep.group()}: the maximum is below the minimum")


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


# --- samplers written in Python ----------------------------------------------------------

class Candidates:
    """The candidate tokens a custom sampler sees, as a zero-copy numpy structured view.

    ``data`` has fields ``id`` (int32), ``logit`` and ``p`` (float32) and is
    llama.cpp's own array: edit logits in place, set :attr:`selected`, or
    :meth:`resize` to keep a prefix. Valid only during ``apply``.
    """

    __slots__ = ("_cur", "data")

    def __init__(self, cur_p: Any) -> None:
        self._cur = cur_p
        self.data: npt.NDArray[Any] = np.frombuffer(ffi.buffer(cur_p.data, cur_p.size * TOKEN_DATA.itemsize),
                                                    dtype=TOKEN_DATA)

    @property
    def ids(self) -> npt.NDArray[np.int32]:
        return self.data["id"]

    @property
    def logits(self) -> npt.NDArray[np.float32]:
        return self.data["logit"]

    @property
    def probs(self) -> npt.NDArray[np.float32]:
        return self.data["p"]

    @property
    def selected(self) -> int:
        return int(self._cur.selected)

    @selected.setter
    def selected(self, index: int) -> None:
        if not 0 <= index < self._cur.size:
            raise IndexError(f"selected index {index} outside [0, {self._cur.size})")
        self._cur.selected = index

    @property
    def sorted(self) -> bool:
        return bool(self._cur.sorted)

    @sorted.setter
    def sorted(self, value: bool) -> None:
        self._cur.sorted = value

    def resize(self, n: int) -> None:
        """Keep only the first ``n`` candidates (shrinking only)."""
        if not 1 <= n <= self._cur.size:
            raise ValueError(f"can only shrink to 1..{self._cur.size} candidates, not {n}")
        self._cur.size = n
        self.data = self.data[:n]


class CustomSampler(Sampler):
    """Subclass and implement :meth:`apply` to write a sampler in Python.

    Set ``selects = True`` when ``apply`` picks the token (sets
    ``candidates.selected``); such a sampler may end a chain. Exceptions raised
    in ``apply`` never cross into llama.cpp: they are re-raised by the
    ``sample()`` call that triggered them.
    """

    name: ClassVar[str] = "python"

    def apply(self, candidates: Candidates) -> None:
        raise NotImplementedError

    def accept(self, token: int) -> None:
        """Called with every token the chain accepts."""

    def reset(self) -> None:
        """Called when the chain is reset."""

    def clone(self) -> CustomSampler:
        return copy.deepcopy(self)

    def _create(self, model: Model | None) -> Any:
        return _new_custom(self)


_IFACE = ffi.new("struct llama_sampler_i *")
_IFACE.name = lib._pyllama_sampler_name
_IFACE.accept = lib._pyllama_sampler_accept
_IFACE.apply = lib._pyllama_sampler_apply
_IFACE.reset = lib._pyllama_sampler_reset
_IFACE.clone = lib._pyllama_sampler_clone
_IFACE.free = lib._pyllama_sampler_free


class _Slot:
    """What a native custom sampler's ctx points to: the Python object and its pending error."""

    __slots__ = ("obj", "name", "error", "handle")

    def __init__(self, obj: CustomSampler) -> None:
        self.obj = obj
        self.name = ffi.new("char[]", type(obj).name.encode())
        self.error: BaseException | None = None
        self.handle: Any = None


# Live native custom samplers: the handle must outlive the C object, so it is held
# here until llama.cpp calls free.
_LIVE: dict[int, _Slot] = {}
_LIVE_LOCK = threading.Lock()


def _new_custom(obj: CustomSampler) -> Any:
    slot = _Slot(obj)
    slot.handle = ffi.new_handle(slot)
    ptr = lib.llama_sampler_init(_IFACE, slot.handle)
    if ptr == ffi.NULL:
        raise SamplerError("llama_sampler_init failed")
    with _LIVE_LOCK:
        _LIVE[int(ffi.cast("uintptr_t", ptr))] = slot
    return ptr


def _slot(smpl: Any) -> _Slot:
    return ffi.from_handle(smpl.ctx)  # type: ignore[no-any-return]


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _pyllama_sampler_name(smpl: Any) -> Any:
    return _slot(smpl).name


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _pyllama_sampler_apply(smpl: Any, cur_p: Any) -> None:
    slot = _slot(smpl)
    try:
        slot.obj.apply(Candidates(cur_p))
        if slot.obj.selects and not 0 <= cur_p.selected < cur_p.size:
            raise SamplerError(f"{type(slot.obj).__name__}.apply did not set candidates.selected")
    except BaseException as exc:  # noqa: BLE001 - must not cross into C
        if slot.error is None:
            slot.error = exc
        if cur_p.size > 0 and not 0 <= cur_p.selected < cur_p.size:
            cur_p.selected = 0  # keep llama.cpp's invariant; the error is raised after


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _pyllama_sampler_accept(smpl: Any, token: int) -> None:
    slot = _slot(smpl)
    try:
        slot.obj.accept(int(token))
    except BaseException as exc:  # noqa: BLE001
        slot.error = slot.error or exc


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _pyllama_sampler_reset(smpl: Any) -> None:
    slot = _slot(smpl)
    try:
        slot.obj.reset()
    except BaseException as exc:  # noqa: BLE001
        slot.error = slot.error or exc


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _pyllama_sampler_clone(smpl: Any) -> Any:
    slot = _slot(smpl)
    try:
        return _new_custom(slot.obj.clone())
    except BaseException as exc:  # noqa: BLE001
        slot.error = slot.error or exc
        return ffi.NULL


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _pyllama_sampler_free(smpl: Any) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(int(ffi.cast("uintptr_t", smpl)), None)


def _raise_custom_errors(chain: Any) -> None:
    for i in range(lib.llama_sampler_chain_n(chain)):
        slot = _LIVE.get(int(ffi.cast("uintptr_t", lib.llama_sampler_chain_get(chain, i))))
        if slot is not None and slot.error is not None:
            err, slot.error = slot.error, None
            if isinstance(err, SamplerError):
                raise err
            raise SamplerError(f"custom sampler {type(slot.obj).__name__} raised {err!r}") from err


# --- the chain ----------------------------------------------------------------------------

def sampling_error() -> str:
    """The message of this thread's last failed sampling call in libpyllama-common."""
    return str(ffi.string(lib.pyllama_sampling_error()).decode("utf-8", "replace"))


class SamplerChain(Handle):
    """A llama.cpp sampler chain built from specs (and custom samplers)."""

    _kind = "sampler chain"

    def __init__(self, samplers: Sequence[Sampler], model: Model | None = None, *, perf: bool = False) -> None:
        if not samplers:
            raise SamplerError("a sampler chain needs at least one sampler")
        if not samplers[-1].selects:
            raise SamplerError(
                f"the last sampler ({type(samplers[-1]).__name__}) does not select a token: "
                "end the chain with Greedy(), Dist(), Mirostat(), MirostatV2() or a selecting custom sampler")
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = not perf
        chain = lib.llama_sampler_chain_init(params)
        try:
            for spec in samplers:
                lib.llama_sampler_chain_add(chain, spec._create(model))  # the chain takes ownership
        except BaseException:
            lib.llama_sampler_free(chain)
            raise
        super().__init__(chain, lib.llama_sampler_free, model)
        self.specs = tuple(samplers)
        self._out = ffi.new("llama_token *")
        self._has_custom = any(isinstance(s, CustomSampler) for s in samplers)
        self.model = model

    def sample(self, ctx: Context, i: int = -1) -> int:
        """Sample a token from the logits of batch row ``i`` and accept it into the chain's history."""
        cp = ctx._p()
        if getattr(self, "_backend_bound", False) and all(c is not self for c in ctx._backend_samplers.values()):
            # initialised for the graph once, llama.cpp's chain asserts when it samples on the host
            raise ValueError("this SamplerChain was attached for backend sampling and samples only where it is "
                             "attached")
        if lib.llama_get_logits_ith(cp, i) == ffi.NULL:  # llama.cpp would assert
            raise IndexError(f"no logits for batch row {i}")
        return self._sample(cp, i)

    def _sample(self, ctx_ptr: Any, i: int) -> int:
        # For callers that know row i has logits (the generation loop).
        chain = self._ptr
        if chain is None:
            self._p()
        out = self._out
        # Through libpyllama-common: a sampler's C++ exception (a grammar with no allowed
        # token left, say) becomes a SamplerError instead of std::terminate.
        if lib.pyllama_sampler_sample(chain, ctx_ptr, i, out) != 0:
            raise SamplerError(f"sampling failed: {sampling_error()}")
        if self._has_custom:
            _raise_custom_errors(chain)
        return int(out[0])

    def accept(self, token: int) -> None:
        # llama.cpp's grammar and DRY samplers throw std::out_of_range through the C API
        # (std::terminate) for an id outside the vocabulary: check it here.
        n_vocab = self.model.vocab.n_tokens if self.model is not None else 2**31
        if not 0 <= int(token) < n_vocab:
            raise TokenizationError(f"token id {int(token)} is outside the vocabulary [0, {n_vocab})")
        chain = self._p()
        # A grammar throws (std::terminate) when it accepts a token it does not allow: ask it first,
        # by applying it to a one-candidate array (a disallowed token's logit becomes -inf).
        for i, spec in enumerate(self.specs):
            if isinstance(spec, Grammar):
                cand = ffi.new("llama_token_data *", {"id": int(token), "logit": 0.0, "p": 0.0})
                arr = ffi.new("llama_token_data_array *", {"data": cand, "size": 1, "selected": -1, "sorted": False})
                lib.llama_sampler_apply(lib.llama_sampler_chain_get(chain, i), arr)
                if cand.logit == float("-inf"):
                    raise SamplerError(f"token {int(token)} is not allowed by the grammar at this point")
        if lib.pyllama_sampler_accept(chain, token) != 0:
            raise SamplerError(f"accepting token {int(token)} failed: {sampling_error()}")

    def reset(self) -> None:
        lib.llama_sampler_reset(self._p())
        if self._has_custom:
            _raise_custom_errors(self._ptr)

    @property
    def seed(self) -> int:
        """The seed the chain's random sampler actually uses."""
        return int(lib.llama_sampler_get_seed(self._p()))

    def __len__(self) -> int:
        return int(lib.llama_sampler_chain_n(self._p()))

    def names(self) -> list[str]:
        chain = self._p()
        return [ffi.string(lib.llama_sampler_name(lib.llama_sampler_chain_get(chain, i))).decode()
                for i in range(len(self))]

    def __repr__(self) -> str:
        return "<pyllama.SamplerChain closed>" if self.closed else f"<pyllama.SamplerChain {' -> '.join(self.names())}>"


def greedy() -> list[Sampler]:
    return [Greedy()]


def default_chain(*, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                  seed: int = DEFAULT_SEED) -> list[Sampler]:
    """llama.cpp's usual chain; ``temperature <= 0`` gives greedy decoding."""
    if temperature <= 0:
        return [Greedy()]
    return [TopK(top_k), TopP(top_p), MinP(min_p), Temp(temperature), Dist(seed)]


__all__ = [
    "Sampler", "SamplerChain", "CustomSampler", "Candidates", "TOKEN_DATA", "DEFAULT_SEED",
    "Greedy", "Dist", "TopK", "TopP", "MinP", "Typical", "Temp", "TempExt", "XTC", "TopNSigma",
    "Mirostat", "MirostatV2", "AdaptiveP", "Grammar", "Penalties", "DRY", "LogitBias", "Infill",
    "greedy", "default_chain",
]
