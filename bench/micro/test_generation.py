"""Per-token generation overhead: pyllama's loop against llama-bench's C loop on the same model.

The synthetic model is tiny, so a decode costs little and the time spent in
Python per token is a large, visible share: this is the worst case for a
binding. Every loop generates 64 tokens from an empty KV cache in a context of
64 cells, exactly llama-bench's ``-p 0 -n 64`` test, on one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import GENERATION, THREADS

import pyllama
from pyllama._ffi import lib

N = 64


@pytest.fixture()
def ctx(synth_model: pyllama.Model) -> Iterator[pyllama.Context]:
    with synth_model.context(n_ctx=N, n_batch=2048, n_ubatch=512, n_threads=THREADS, n_threads_batch=THREADS,
                             swa_full=False, no_perf=True) as c:
        yield c


def _tokens(model: pyllama.Model) -> np.ndarray[Any, np.dtype[np.int32]]:
    toks = np.random.default_rng(0).integers(0, model.vocab.n_tokens, N, dtype=np.int32)
    toks[0] = model.vocab.bos or 0
    return toks


def _record(name: str, benchmark: Any, ctx: pyllama.Context) -> None:
    us = benchmark.stats.stats.median / N * 1e6
    GENERATION.setdefault("per_token", {})[name] = us
    GENERATION.update(model=ctx.model.path, n=N)
    benchmark.extra_info["us_per_token"] = round(us, 2)


def test_tg_pyllama_decode_loop(benchmark: Any, ctx: pyllama.Context) -> None:
    """Batch.add + Context.decode + synchronize per token: llama-bench's test_gen through the public API."""
    toks = _tokens(ctx.model)
    batch = pyllama.Batch(1)

    def run() -> None:
        ctx.kv.clear(data=False)
        for i in range(N):
            batch.clear().add(toks[i:i + 1], i, 0, logits="all")
            ctx.decode(batch)
            ctx.synchronize()

    run()  # warm-up, as llama-bench does
    benchmark(run)
    _record("pyllama decode loop", benchmark, ctx)


def test_tg_raw_cffi_loop(benchmark: Any, ctx: pyllama.Context) -> None:
    """The floor of any cffi binding: llama_decode + llama_synchronize called directly from Python."""
    toks = _tokens(ctx.model)
    batch = pyllama.Batch(1).add(toks[:1], 0, 0, logits="all")
    p, native = ctx._p(), batch._native()
    mem = lib.llama_get_memory(p)

    def run() -> None:
        lib.llama_memory_clear(mem, False)
        for i in range(N):
            batch.token[0] = toks[i]
            batch.pos[0] = i
            lib.llama_decode(p, native)
            lib.llama_synchronize(p)

    run()
    benchmark(run)
    _record("raw cffi loop", benchmark, ctx)


def test_tg_generate_greedy(benchmark: Any, ctx: pyllama.Context) -> None:
    """pyllama.generate with greedy sampling and detokenization: the full per-token path a user sees."""
    def run() -> None:
        ctx.kv.clear()
        with pyllama.generate(ctx, [1], max_tokens=N - 1, reuse_prefix=False) as gen:
            for _ in gen:
                pass

    run()
    benchmark(run)
    _record("pyllama.generate (greedy)", benchmark, ctx)


def test_tg_agenerate_greedy(benchmark: Any, ctx: pyllama.Context) -> None:
    """pyllama.agenerate consumed by ``async for`` on one event loop: one producer thread per generation."""
    import asyncio

    loop = asyncio.new_event_loop()

    async def consume() -> None:
        async for _ in pyllama.agenerate(ctx, [1], max_tokens=N - 1, reuse_prefix=False):
            pass

    def run() -> None:
        ctx.kv.clear()
        loop.run_until_complete(consume())

    run()
    benchmark(run)
    loop.close()
    _record("pyllama.agenerate (greedy)", benchmark, ctx)


def test_tg_c_generate_loop(benchmark: Any, ctx: pyllama.Context) -> None:
    """The same sample + decode loop as pyllama.generate, in C (pyllama_c_generate_loop in the binding)."""
    from pyllama._ffi import ffi

    out = np.empty(N - 1, dtype=np.int32)
    chain = pyllama.SamplerChain([pyllama.Greedy()], ctx.model)

    def run() -> None:
        ctx.kv.clear()
        ctx.decode(pyllama.Batch.from_tokens([1], 0, 0))
        lib.pyllama_c_generate_loop(ctx._p(), chain._p(), 1, N - 1, ffi.from_buffer("llama_token[]", out))

    run()
    benchmark(run)
    chain.close()
    _record("C sample+decode loop", benchmark, ctx)
