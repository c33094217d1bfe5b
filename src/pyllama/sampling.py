"""Sampling: chains of llama.cpp's samplers, and samplers written in Python.

A chain is built from sampler specs (:mod:`pyllama.samplers`) against a model::

    chain = pyllama.SamplerChain([TopK(40), TopP(0.95), Temp(0.8), Dist(seed=1)], model)
    token = chain.sample(ctx)            # sample from the last logits, and accept

The last sampler must select a token (Greedy, Dist, Mirostat, MirostatV2,
AdaptiveP, or a custom sampler with ``selects = True``): llama.cpp would abort
on a chain that leaves no selection, so pyllama refuses to build one.
"""

from __future__ import annotations

import copy
import threading
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import numpy.typing as npt

from ._context_access import attached_chains, native
from ._ffi import ffi, lib
from ._handle import Handle
from .errors import SamplerError, TokenizationError
from .samplers import TOKEN_DATA, Grammar, Sampler

if TYPE_CHECKING:
    from .context import Context
    from .model import Model


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
        cp = native(ctx)
        if getattr(self, "_backend_bound", False) and all(c is not self for c in attached_chains(ctx)):
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


__all__ = [
    "SamplerChain", "CustomSampler", "Candidates", "sampling_error",
]
