"""The parameters a context is made with: its memory knobs and its thread counts.

Shared by :class:`~pyllama.Context` (which creates contexts) and :mod:`pyllama.fit` (which fits and
projects memory for a context it does not create), so both read the knobs the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Union

from ._ffi import ffi, lib

if TYPE_CHECKING:
    from .model import Model

FlashAttn = Union[Literal["auto", "on", "off"], bool]


class ContextKnobs(TypedDict, total=False):
    """The keywords of :class:`pyllama.Context` (its signature documents each) but what it computes
    (``embeddings``, ``pooling``): what ``pyllama.embed(model, ...)`` and ``pyllama.rerank(model, ...)`` take
    for the context they make."""

    n_ctx: int | Literal["auto"]
    n_batch: int
    n_ubatch: int
    n_seq_max: int
    n_threads: int | None
    n_threads_batch: int | None
    flash_attn: FlashAttn
    type_k: str | int
    type_v: str | int
    offload_kqv: bool
    op_offload: bool
    attention: str | None
    rope_scaling: str | None
    rope_freq_base: float
    rope_freq_scale: float
    yarn_ext_factor: float
    yarn_attn_factor: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    yarn_orig_ctx: int
    swa_full: bool
    kv_unified: bool
    no_perf: bool


class ContextOptions(ContextKnobs, total=False):
    """Every keyword of :class:`pyllama.Context`, for ``model.context(...)``; tests/test_options.py checks
    that the two lists are the same."""

    embeddings: bool
    pooling: str | None

_FLASH = {"auto": -1, "on": 1, "off": 0, True: 1, False: 0}


def ggml_type(name: str | int) -> int:
    """``"f16"``, ``"q8_0"``, ... → the ggml_type enum value."""
    if isinstance(name, int):
        return name
    attr = "GGML_TYPE_" + name.upper()
    if not hasattr(lib, attr):
        raise ValueError(f"unknown ggml type {name!r} (try f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl)")
    return int(getattr(lib, attr))


def ggml_type_name(value: int) -> str:
    return ffi.string(lib.ggml_type_name(value)).decode() if hasattr(lib, "ggml_type_name") else str(value)


def set_memory_params(p: Any, *, n_ctx: object, n_batch: int = 2048, n_ubatch: int = 512, n_seq_max: int = 1,
                      flash_attn: FlashAttn = "auto", type_k: str | int = "f16", type_v: str | int = "f16",
                      kv_unified: bool = False, offload_kqv: bool = True, swa_full: bool = True) -> None:
    """Validate and set the ``llama_context_params`` knobs that decide a context's memory.

    Shared by :class:`Context` and :mod:`pyllama.fit` (which fits and projects
    for a context it does not create), so both read the knobs the same way.
    """
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 0:
        raise ValueError(f"n_ctx must be a non-negative int or 'auto', not {n_ctx!r}")
    if n_batch < 1 or n_ubatch < 1 or n_seq_max < 1:
        raise ValueError("n_batch, n_ubatch and n_seq_max must be >= 1")
    if n_seq_max > lib.llama_max_parallel_sequences():
        raise ValueError(f"n_seq_max={n_seq_max} exceeds llama.cpp's limit {lib.llama_max_parallel_sequences()}")
    if flash_attn not in _FLASH:
        raise ValueError(f"flash_attn must be 'auto', 'on' or 'off', not {flash_attn!r}")
    p.n_ctx = n_ctx
    p.n_batch = n_batch
    p.n_ubatch = min(n_ubatch, n_batch)
    p.n_seq_max = n_seq_max
    p.flash_attn_type = _FLASH[flash_attn]
    p.type_k = ggml_type(type_k)
    p.type_v = ggml_type(type_v)
    p.kv_unified = kv_unified
    p.offload_kqv = offload_kqv
    p.swa_full = swa_full


@dataclass(frozen=True)
class ThreadChoice:
    """The default thread count for a context, and why."""

    n_threads: int
    reason: str


def thread_choice(model: Model | None = None) -> ThreadChoice:
    """What a context uses when ``n_threads`` is not given.

    llama.cpp's own tools take ``cpu_get_num_math()`` (physical performance
    cores: no SMT siblings, no efficiency cores on hybrid CPUs); pyllama asks
    that same code, caps it by the CPUs this process may run on (affinity,
    containers), and uses at most 2 when every layer of ``model`` sits on a GPU,
    where the CPU only feeds the device.
    """
    allowed = _allowed_cpus()
    math = int(lib.pyllama_cpu_get_num_math())
    if math < 1:
        n, why = allowed, f"{allowed} CPUs this process may use (llama.cpp's core count failed)"
    elif math <= allowed:
        n, why = math, f"llama.cpp's cpu_get_num_math: {math} physical performance cores"
    else:
        n, why = allowed, f"{allowed} CPUs this process may use (of {math} physical performance cores)"
    if model is not None and model.fully_offloaded and n > 2:
        n, why = 2, f"every layer is on a GPU: 2 threads feed it ({why} otherwise)"
    return ThreadChoice(n, why)


def default_threads(model: Model | None = None) -> int:
    """The default thread count (see :func:`thread_choice`)."""
    return thread_choice(model).n_threads


def _allowed_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


# ggml's own limit: the length of its thread pools' CPU masks (ggml.h GGML_MAX_N_THREADS). More
# threads than that overrun ggml's per-thread arrays; llama.cpp itself checks nothing (issue 11:
# set_threads(100000) crashed at the next decode).
MAX_THREADS = int(lib.GGML_MAX_N_THREADS)


def check_threads(name: str, n: object) -> int:
    """Validate a thread count: an int in [1, MAX_THREADS].

    0 and negative counts are refused (llama.cpp gives them no meaning). Counts
    above the CPUs this process may use (its affinity mask) are allowed,
    as llama.cpp allows them, but only slow ggml down: its workers spin at
    barriers, so oversubscribed threads wait for each other.
    """
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"{name} must be an int, not {type(n).__name__}")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{name} must be in [1, {MAX_THREADS}] (this process may use {_allowed_cpus()} CPUs), "
                         f"not {n}")
    return n


__all__ = ["FlashAttn", "ggml_type", "ggml_type_name", "set_memory_params", "ThreadChoice", "thread_choice",
           "default_threads", "check_threads", "MAX_THREADS"]
