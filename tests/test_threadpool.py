"""Threadpool: ggml's CPU thread pool attached to contexts, its arguments and its lifetime."""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

import pytest

import pyllama
from pyllama import threadpool as tp_module
from pyllama.threadpool import MAX_THREADS, Threadpool, parse_cpu_mask

PROMPT = "Hello world"


def _greedy(ctx: pyllama.Context, n: int = 8) -> list[int]:
    with pyllama.generate(ctx, PROMPT, max_tokens=n, reuse_prefix=False) as gen:
        return [ev.token for ev in gen if ev.token >= 0]


@pytest.fixture(scope="module")
def reference(model: pyllama.Model) -> list[int]:
    """The greedy continuation without any pool."""
    with model.context(n_ctx=128, n_threads=2) as ctx:
        return _greedy(ctx)


def _cpu0_allowed() -> bool:
    return not hasattr(os, "sched_getaffinity") or 0 in os.sched_getaffinity(0)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_pool_gives_the_same_greedy_tokens(model: pyllama.Model, reference: list[int], n_threads: int) -> None:
    with model.context(n_ctx=128, n_threads=2) as ctx, Threadpool(n_threads) as pool:
        pool.attach(ctx)
        assert pool.contexts == (ctx,)
        assert (ctx.n_threads, ctx.n_threads_batch) == (n_threads, n_threads)  # the pool's size
        assert _greedy(ctx) == reference


def test_batch_pool_poll_zero_and_strict_mask(model: pyllama.Model, reference: list[int]) -> None:
    if not _cpu0_allowed():
        pytest.skip("CPU 0 is not available to this process")
    with model.context(n_ctx=128) as ctx, \
            Threadpool(1, cpu_mask="0x1", strict_cpu=True, poll=0) as gen_pool, \
            Threadpool(2, poll=0, prio="normal", paused=True) as batch_pool:
        assert (gen_pool.cpus, gen_pool.strict_cpu, gen_pool.poll) == ((0,), True, 0)
        gen_pool.attach(ctx, batch=batch_pool)
        assert (ctx.n_threads, ctx.n_threads_batch) == (1, 2)
        assert batch_pool.contexts == gen_pool.contexts == (ctx,)
        assert _greedy(ctx) == reference  # the paused batch pool wakes at the first decode


def test_pause_and_resume(model: pyllama.Model, reference: list[int]) -> None:
    with model.context(n_ctx=128) as ctx, Threadpool(2) as pool:
        pool.attach(ctx)
        pool.pause()
        assert _greedy(ctx) == reference  # a decode resumes a paused pool
        pool.pause()
        pool.resume()
        assert _greedy(ctx) == reference


def test_close_while_attached_detaches_and_frees_after_the_context(model: pyllama.Model,
                                                                   reference: list[int]) -> None:
    ctx = model.context(n_ctx=128, n_threads=2)
    pool = Threadpool(2)
    native = pool._native
    pool.attach(ctx)
    assert _greedy(ctx) == reference
    pool.close()
    pool.close()  # idempotent
    assert pool.closed and pool.contexts == ()
    assert _greedy(ctx) == reference  # on the context's own threads again
    # The context's CPU backend still points at the pool until it is freed: the pool waits.
    assert native.ptr is not None and native in tp_module._RETIRED
    ctx.close()
    Threadpool(1).close()  # any threadpool call frees what has become free
    assert native.ptr is None and native not in tp_module._RETIRED


def test_detach_and_replace(model: pyllama.Model, reference: list[int]) -> None:
    with model.context(n_ctx=128) as ctx, Threadpool(1) as a, Threadpool(2) as b:
        a.attach(ctx)
        b.attach(ctx)  # replaces a
        assert a.contexts == () and b.contexts == (ctx,)
        with pytest.raises(ValueError, match="not attached"):
            a.detach(ctx)
        b.detach(ctx)
        assert not b.contexts
        assert _greedy(ctx) == reference
        b.attach(ctx)
        ctx.close()
        b.detach(ctx)  # a closed context needs no detaching
        assert not b.contexts


def test_closed_pool_or_context_raise(model: pyllama.Model) -> None:
    ctx = model.context(n_ctx=128)
    pool = Threadpool(1)
    pool.close()
    with pytest.raises(pyllama.ClosedError):
        pool.attach(ctx)
    with pytest.raises(pyllama.ClosedError):
        Threadpool(1).attach(ctx, batch=pool)
    with pytest.raises(pyllama.ClosedError):
        pool.pause()
    with pytest.raises(pyllama.ClosedError):
        pool.detach(ctx)
    with pytest.raises(pyllama.ClosedError), pool:
        pass
    ctx.close()
    with Threadpool(1) as live, pytest.raises(pyllama.ClosedError):
        live.attach(ctx)
    with pytest.raises(TypeError):
        Threadpool(1).attach("not a context")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_threads": 0}, "n_threads"),
        ({"n_threads": MAX_THREADS + 1}, "n_threads"),
        ({"n_threads": True}, "n_threads"),
        ({"n_threads": 2.0}, "n_threads"),
        ({"n_threads": 1, "poll": -1}, "poll"),
        ({"n_threads": 1, "poll": 101}, "poll"),
        ({"n_threads": 1, "prio": "urgent"}, "prio"),
        ({"n_threads": 1, "prio": 4}, "prio"),
        ({"n_threads": 1, "cpu_mask": "0xZ"}, "invalid hex character 'Z' at position 2"),
        ({"n_threads": 1, "cpu_mask": "0X1"}, "invalid hex character 'X' at position 1"),
        ({"n_threads": 1, "cpu_mask": "1" * (MAX_THREADS // 4 + 1)}, "hex digits"),
        ({"n_threads": 1, "cpu_mask": [0, MAX_THREADS]}, "outside"),
        ({"n_threads": 1, "cpu_mask": [-1]}, "outside"),
    ],
)
def test_invalid_arguments_fail_before_llama_cpp(monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any],
                                                 message: str) -> None:
    def no_native_call() -> None:
        raise AssertionError("reached llama.cpp")

    monkeypatch.setattr(tp_module, "_procs", no_native_call)
    with pytest.raises(ValueError, match=message):
        Threadpool(**kwargs)


def test_wrong_types_are_type_errors() -> None:
    with pytest.raises(TypeError):
        Threadpool(1, cpu_mask=[0.5])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        parse_cpu_mask(0x5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mask", "cpus"),
    [("0x5", (0, 2)), ("5", (0, 2)), ("0xA0", (5, 7)), ("0xf0000000000000001", (0, 64, 65, 66, 67)),
     ("", ()), ("0x", ()), ("0x0", ()), ("F" * (MAX_THREADS // 4), tuple(range(MAX_THREADS)))],
)
def test_cpu_mask_is_llama_cpps(mask: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_mask(mask) == cpus


def test_cpu_sequence_and_priority_names() -> None:
    with Threadpool(2, cpu_mask=[1, 0, 1], prio="low") as pool:
        assert pool.cpus == (0, 1) and pool.prio == -1 and pool.n_threads == 2
    with Threadpool(1, prio=0) as pool:
        assert pool.prio == 0 and pool.cpus == ()


def test_garbage_collection(model: pyllama.Model, reference: list[int]) -> None:
    ref = weakref.ref(Threadpool(2))
    gc.collect()
    assert ref() is None  # an unreferenced pool is freed

    # An attached pool lives as long as its context needs it.
    ctx = model.context(n_ctx=128)
    Threadpool(1).attach(ctx)
    gc.collect()
    (pool,) = [p for p in tp_module._ATTACHED[ctx] if p is not None]
    native = pool._native
    del pool
    assert _greedy(ctx) == reference
    del ctx
    gc.collect()
    assert native.ptr is None and native not in tp_module._RETIRED


def test_set_threads_cannot_outgrow_the_attached_pool(model: pyllama.Model, reference: list[int]) -> None:
    with model.context(n_ctx=128, n_threads=1) as ctx, Threadpool(1) as pool, Threadpool(2) as big:
        pool.attach(ctx)
        with pytest.raises(ValueError, match="attached Threadpool has 1"):
            ctx.set_threads(2)
        assert (ctx.n_threads, ctx.n_threads_batch) == (1, 1)
        big.attach(ctx)  # replaces the small pool
        ctx.set_threads(2, 1)
        assert _greedy(ctx) == reference
        big.detach(ctx)
        ctx.set_threads(4)  # no pool: ggml makes its own threads
        with pytest.raises(ValueError):
            ctx.set_threads(0)
