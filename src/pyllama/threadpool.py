"""Threadpool: llama.cpp's CPU thread pool (``ggml_threadpool``), attached to contexts.

A context without a pool lets ggml create a disposable one for every graph;
an attached pool keeps its threads between decodes and applies a CPU mask,
thread priority and polling level (what llama-bench's ``-C``, ``--cpu-strict``,
``--prio`` and ``--poll`` set)::

    with pyllama.Threadpool(4, cpu_mask="0xf", poll=0) as pool:
        pool.attach(ctx)
        ...

The CPU backend is a module loaded at run time, so ``ggml_threadpool_new`` and
``ggml_threadpool_free`` are fetched from its registry, as llama-bench does.
"""

from __future__ import annotations

import ctypes
import os
import string
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Union

from ._ffi import ffi, lib
from ._handle import Handle
from ._context_access import guard, native
from .context import Context
from .errors import LlamaError

MAX_THREADS = int(lib.GGML_MAX_N_THREADS)  # the length of ggml_threadpool_params.cpumask

PriorityName = Literal["low", "normal", "medium", "high", "realtime"]
Priority = Union[PriorityName, int]
CpuMask = Union[str, Sequence[int], None]

PRIORITIES: dict[str, int] = {
    "low": int(lib.GGML_SCHED_PRIO_LOW),
    "normal": int(lib.GGML_SCHED_PRIO_NORMAL),
    "medium": int(lib.GGML_SCHED_PRIO_MEDIUM),
    "high": int(lib.GGML_SCHED_PRIO_HIGH),
    "realtime": int(lib.GGML_SCHED_PRIO_REALTIME),
}


def parse_cpu_mask(mask: str) -> tuple[int, ...]:
    """The CPUs of a llama.cpp hex CPU mask (``"0x5"`` → ``(0, 2)``), as ``parse_cpu_mask`` in common reads it.

    An optional lowercase ``0x`` prefix, then hex digits, the lowest bit being
    CPU 0; ``""``, ``"0x"`` and ``"0x0"`` mean no mask (the inherited affinity).
    llama.cpp silently reinterprets masks of more than 128 digits; those are
    refused here.
    """
    if not isinstance(mask, str):
        raise TypeError(f"a CPU mask is a hex string, not {type(mask).__name__}")
    skip = 2 if mask.startswith("0x") else 0
    digits = mask[skip:]
    if len(digits) > MAX_THREADS // 4:
        raise ValueError(f"CPU mask {mask!r} has {len(digits)} hex digits; at most {MAX_THREADS // 4} "
                         f"({MAX_THREADS} CPUs)")
    for pos, c in enumerate(digits, skip):
        if c not in string.hexdigits:
            raise ValueError(f"invalid hex character {c!r} at position {pos} of CPU mask {mask!r}")
    value = int(digits, 16) if digits else 0
    return tuple(i for i in range(value.bit_length()) if value >> i & 1)


def _cpus(cpu_mask: CpuMask) -> tuple[int, ...]:
    if cpu_mask is None:
        return ()
    if isinstance(cpu_mask, str):
        return parse_cpu_mask(cpu_mask)
    cpus: set[int] = set()
    for cpu in cpu_mask:
        if not isinstance(cpu, int) or isinstance(cpu, bool):
            raise TypeError(f"CPU indices must be ints, not {type(cpu).__name__}")
        if not 0 <= cpu < MAX_THREADS:
            raise ValueError(f"CPU index {cpu} is outside [0, {MAX_THREADS})")
        cpus.add(cpu)
    return tuple(sorted(cpus))


def _priority(prio: Priority) -> int:
    if isinstance(prio, bool):
        raise TypeError("prio must be a priority name or an int")
    if isinstance(prio, int):
        if prio not in PRIORITIES.values():
            raise ValueError(f"prio must be one of {sorted(PRIORITIES.values())} (or a name), not {prio}")
        return prio
    if prio not in PRIORITIES:
        raise ValueError(f"prio must be one of {', '.join(PRIORITIES)} (or -1..3), not {prio!r}")
    return PRIORITIES[prio]


# --- the CPU backend's entry points ------------------------------------------------------

@dataclass(frozen=True)
class _CpuProcs:
    new: Any
    free: Any
    pause: Any | None
    resume: Any | None


def _symbol_beside(fn: Any, name: str, ctype: str) -> Any | None:
    """``name`` from the shared library that holds function ``fn``, or None.

    The CPU backend exports ggml_threadpool_pause/resume but does not list
    them in its proc-address table; dladdr() names the very module (of the
    possibly several CPU variants) that created the pool. POSIX only.
    """
    if sys.platform == "win32" or not hasattr(os, "RTLD_NOLOAD"):
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        dladdr = ctypes.CDLL(None).dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
        info = DlInfo()
        if not dladdr(int(ffi.cast("uintptr_t", fn)), ctypes.byref(info)) or not info.dli_fname:
            return None
        # RTLD_NOLOAD: a handle on the copy ggml already loaded, never a second one.
        module = ctypes.CDLL(os.fsdecode(info.dli_fname), mode=os.RTLD_NOLOAD)
        addr = ctypes.cast(getattr(module, name), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    return ffi.cast(ctype, addr) if addr else None


@lru_cache(maxsize=1)
def _procs() -> _CpuProcs:
    dev = lib.ggml_backend_dev_by_type(lib.GGML_BACKEND_DEVICE_TYPE_CPU)
    if dev == ffi.NULL:
        raise LlamaError("the CPU backend is not loaded: no threadpool can be created")
    reg = lib.ggml_backend_dev_backend_reg(dev)

    def proc(name: str, ctype: str) -> Any | None:
        p = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
        return None if p == ffi.NULL else ffi.cast(ctype, p)

    new = proc("ggml_threadpool_new", "struct ggml_threadpool *(*)(struct ggml_threadpool_params *)")
    free = proc("ggml_threadpool_free", "void (*)(struct ggml_threadpool *)")
    if new is None or free is None:
        raise LlamaError("this CPU backend does not export ggml_threadpool_new/ggml_threadpool_free")
    found: dict[str, Any | None] = {}
    for name in ("ggml_threadpool_pause", "ggml_threadpool_resume"):
        ctype = "void (*)(struct ggml_threadpool *)"
        found[name] = proc(name, ctype) or _symbol_beside(new, name, ctype)
    return _CpuProcs(new, free, found["ggml_threadpool_pause"], found["ggml_threadpool_resume"])


# --- who uses which pool -------------------------------------------------------------------
#
# llama_detach_threadpool only clears the context's pointers: the context's CPU
# backend keeps the last pool it ran on and calls ggml_threadpool_pause on it
# at the next decode. So a C pool is freed only once its Threadpool is closed
# AND every context it was ever attached to is freed; until then it waits in
# _RETIRED (its threads asleep). Lock order: Context._lock, then _LOCK.

_LOCK = threading.RLock()  # reentrant: a garbage collection inside it may run _sweep
# What each context runs on; the strong values keep an attached pool alive as long as its context.
_ATTACHED: weakref.WeakKeyDictionary[Context, tuple[Threadpool, Threadpool | None]] = weakref.WeakKeyDictionary()
_RETIRED: set[_Native] = set()


def _ctx_live(ctx: Context) -> bool:
    # _finalizer.alive: at interpreter exit the context may be freed by its finalizer without close()
    return not ctx.closed


def _sweep(_ref: object = None) -> None:
    """Free the retired pools whose contexts are all gone (also the callback of a context's weakref)."""
    with _LOCK:
        for native in list(_RETIRED):
            if not native.in_use() and native.lock.acquire(blocking=False):  # busy: a later sweep frees it
                try:
                    _RETIRED.discard(native)
                    native.free_now()
                finally:
                    native.lock.release()


def _pool_sizes(ctx: Context) -> tuple[int, int] | None:
    """Threads of the pools attached to ``ctx`` (main, batch), or None without a pool."""
    with _LOCK:
        pools = _ATTACHED.get(ctx)
    if pools is None:
        return None
    main, batch = pools
    return main._n_threads, (batch or main)._n_threads


class _Native:
    """One C pool and the contexts whose CPU backend may point at it; never refers to its Threadpool."""

    def __init__(self, ptr: Any, free: Any) -> None:
        self.ptr = ptr
        self._free = free
        self.users: list[weakref.ref[Context]] = []
        self.lock = threading.Lock()  # pause/resume against free

    def add_user(self, ctx: Context) -> None:
        if not any(r() is ctx for r in self.users):
            self.users.append(weakref.ref(ctx, _sweep))

    def in_use(self) -> bool:
        self.users = [r for r in self.users if (c := r()) is not None and _ctx_live(c)]
        return bool(self.users)

    def free_now(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            self._free(ptr)

    def release(self, _ptr: Any) -> None:
        """The Handle's free function: runs once, at close() or garbage collection."""
        with _LOCK:
            # Empty under garbage collection: an attached pool is kept alive by _ATTACHED.
            ctxs = [c for c, pools in list(_ATTACHED.items()) if any(p is not None and p._native is self for p in pools)]
        for ctx in ctxs:
            with guard(ctx), _LOCK:  # waits for a decode running on the pool
                pools = _ATTACHED.get(ctx)
                if pools is not None and any(p is not None and p._native is self for p in pools):
                    if _ctx_live(ctx):
                        lib.llama_detach_threadpool(native(ctx))
                    del _ATTACHED[ctx]
        with _LOCK:
            _RETIRED.add(self)
        _sweep()


class Threadpool(Handle):
    """A ggml CPU thread pool: ``n_threads`` threads with a CPU mask, priority and polling level.

    ``cpu_mask``: a hex string as llama.cpp's ``-C`` takes (``"0x3"``: CPUs 0
    and 1) or a sequence of CPU indices; None (default) keeps the inherited
    affinity. ``strict_cpu`` pins thread *i* to the *i*-th CPU of the mask
    instead of letting every thread use the whole mask. ``poll`` (0-100) is
    how long idle threads spin before sleeping. ``prio``: ``"low"``,
    ``"normal"``, ``"medium"``, ``"high"``, ``"realtime"`` or ggml's -1..3.
    ``paused`` starts the threads asleep (the first decode wakes them).
    Every argument is checked before llama.cpp sees it. In builds with
    OpenMP (the default on Linux), ggml ignores ``poll`` and pause/resume.

    A pool runs one graph at a time: contexts sharing a pool must not decode
    at the same time. An attached context keeps its pool alive; closing the
    pool detaches it from its contexts first (they fall back to their own
    threads). The pool's threads are freed when it is closed and every
    context it served is freed too, since a context's CPU backend still refers
    to the last pool it ran on.
    """

    _kind = "threadpool"

    def __init__(self, n_threads: int, *, cpu_mask: CpuMask = None, strict_cpu: bool = False, poll: int = 50,
                 prio: Priority = "normal", paused: bool = False) -> None:
        if not isinstance(n_threads, int) or isinstance(n_threads, bool) or not 1 <= n_threads <= MAX_THREADS:
            raise ValueError(f"n_threads must be an int in [1, {MAX_THREADS}], not {n_threads!r}")
        if not isinstance(poll, int) or isinstance(poll, bool) or not 0 <= poll <= 100:
            raise ValueError(f"poll must be an int in [0, 100], not {poll!r}")
        self._cpus = _cpus(cpu_mask)
        self._prio = _priority(prio)
        self._n_threads, self._poll, self._strict_cpu = n_threads, poll, bool(strict_cpu)
        procs = _procs()
        tpp = ffi.new("struct ggml_threadpool_params *")  # zero-filled: an empty cpumask
        # ggml_threadpool_params_default() is declared in ggml.h, whose functions the binding
        # does not bind: these are the fields ggml_threadpool_params_init (ggml.c) sets.
        tpp.n_threads = n_threads
        tpp.prio = self._prio
        tpp.poll = poll
        tpp.strict_cpu = self._strict_cpu
        tpp.paused = bool(paused)
        for cpu in self._cpus:
            tpp.cpumask[cpu] = True
        _sweep()  # frees retired pools whose contexts were closed since
        ptr = procs.new(tpp)
        if ptr == ffi.NULL:
            raise LlamaError(f"ggml could not create a threadpool of {n_threads} threads")
        self._native = _Native(ptr, procs.free)
        super().__init__(ptr, self._native.release)

    def __enter__(self) -> Threadpool:
        self._p()
        return self

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_threads={self._n_threads}"
        return f"<pyllama.Threadpool {state}>"

    # --- settings --------------------------------------------------------------------------
    @property
    def n_threads(self) -> int:
        return self._n_threads

    @property
    def cpus(self) -> tuple[int, ...]:
        """The CPUs of the mask (empty: the inherited affinity)."""
        return self._cpus

    @property
    def strict_cpu(self) -> bool:
        return self._strict_cpu

    @property
    def poll(self) -> int:
        return self._poll

    @property
    def prio(self) -> int:
        """ggml's priority value (-1 low ... 3 realtime)."""
        return self._prio

    # --- contexts ----------------------------------------------------------------------------
    def attach(self, ctx: Context, batch: Threadpool | None = None) -> None:
        """Run ``ctx``'s decodes on this pool, and its prompt batches on ``batch`` if given.

        Replaces the pools ``ctx`` had, and sets its thread counts to the pools'
        sizes (ggml indexes the pool's threads by the context's count).
        """
        if not isinstance(ctx, Context):
            raise TypeError(f"attach() takes a pyllama.Context, not {type(ctx).__name__}")
        if batch is not None and not isinstance(batch, Threadpool):
            raise TypeError(f"batch must be a Threadpool or None, not {type(batch).__name__}")
        with guard(ctx):
            cp = native(ctx)
            with _LOCK:  # a pool closed concurrently either fails here or sees this context
                tp = self._p()
                bp = batch._p() if batch is not None else ffi.NULL
                lib.llama_attach_threadpool(cp, tp, bp)
                lib.llama_set_n_threads(cp, self._n_threads, (batch or self)._n_threads)
                _ATTACHED[ctx] = (self, batch)
                self._native.add_user(ctx)
                if batch is not None:
                    batch._native.add_user(ctx)

    def detach(self, ctx: Context) -> None:
        """Stop using pools for ``ctx`` (this one and its batch pool): it falls back to its own threads.

        Raises ValueError when this pool is not attached to ``ctx``; a closed
        context needs no detaching.
        """
        if not isinstance(ctx, Context):
            raise TypeError(f"detach() takes a pyllama.Context, not {type(ctx).__name__}")
        self._p()
        with guard(ctx), _LOCK:
            pools = _ATTACHED.get(ctx)
            if not _ctx_live(ctx):
                _ATTACHED.pop(ctx, None)
                return
            if pools is None or self not in pools:
                raise ValueError("this threadpool is not attached to that context")
            lib.llama_detach_threadpool(native(ctx))
            del _ATTACHED[ctx]

    @property
    def contexts(self) -> tuple[Context, ...]:
        """The open contexts this pool is attached to (as main or batch pool)."""
        with _LOCK:
            return tuple(c for c, pools in list(_ATTACHED.items()) if self in pools and _ctx_live(c))

    # --- threads -------------------------------------------------------------------------------
    def pause(self) -> None:
        """Put the threads to sleep until :meth:`resume` or the next decode on this pool."""
        self._call("pause")

    def resume(self) -> None:
        """Wake the threads of a paused pool."""
        self._call("resume")

    def _call(self, which: str) -> None:
        procs = _procs()
        fn = procs.pause if which == "pause" else procs.resume
        if fn is None:
            raise NotImplementedError(f"this CPU backend does not export ggml_threadpool_{which}")
        self._p()
        with self._native.lock:
            if self._native.ptr is not None:  # a retired pool may be freed by now
                fn(self._native.ptr)


__all__ = ["Threadpool", "parse_cpu_mask", "PRIORITIES", "MAX_THREADS"]
