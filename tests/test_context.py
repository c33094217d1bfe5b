"""Context: zero-copy logits, batches, perf counters, abort, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import pyllama
from pyllama._ffi import ffi, lib
from bounded import join_all



def test_logits_view_is_llama_cpp_buffer(model: pyllama.Model) -> None:
    with model.context(n_ctx=128) as ctx:
        toks = model.tokenize("Hello world")
        ctx.decode(pyllama.Batch.from_tokens(toks, logits="all"))
        for i in (0, toks.size - 1):
            view = ctx.logits(i)
            ptr = lib.llama_get_logits_ith(ctx._p(), i)
            assert view.__array_interface__["data"][0] == int(ffi.cast("uintptr_t", ptr))  # no copy
            assert not view.flags.writeable
            native = np.frombuffer(ffi.buffer(ptr, 4 * model.vocab.n_tokens), dtype=np.float32)
            assert np.array_equal(view, native)
            assert view.shape == (model.vocab.n_tokens,) and np.isfinite(view).all()
        assert ctx.logits_all().shape == (toks.size, model.vocab.n_tokens)
        assert np.array_equal(ctx.logits_all()[-1], ctx.logits(-1))


def test_logits_row_without_output_raises(model: pyllama.Model) -> None:
    with model.context(n_ctx=128) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(model.tokenize("Hello world"), logits="last"))
        with pytest.raises(IndexError):
            ctx.logits(0)


def test_batch_validation(model: pyllama.Model) -> None:
    with model.context(n_ctx=32, n_batch=16) as ctx:
        with pytest.raises(pyllama.InvalidBatchError):
            ctx.decode(pyllama.Batch.from_tokens([1, 10_000]))
        with pytest.raises(pyllama.InvalidBatchError):
            ctx.decode(pyllama.Batch.from_tokens(np.ones(17, dtype=np.int32)))
        with pytest.raises(pyllama.InvalidBatchError):
            ctx.decode(pyllama.Batch.from_tokens([1, 2], seq_id=3))
        n_ctx = ctx.n_ctx  # llama.cpp pads the requested size
        with pytest.raises(pyllama.ContextOverflowError):
            ctx.decode(pyllama.Batch.from_tokens([1, 2], pos0=n_ctx - 1))
        with pytest.raises(pyllama.ContextOverflowError):
            pyllama.generate_text(ctx, np.full(n_ctx + 8, 300, dtype=np.int32), max_tokens=1)
        # the context is still usable after every refusal
        assert pyllama.generate_text(ctx, "Hello", max_tokens=2)


def test_batch_from_arrays_for_many_sequences(model: pyllama.Model) -> None:
    with model.context(n_ctx=256, n_seq_max=2) as ctx:
        a, b = model.tokenize("Hello world"), model.tokenize("Le café")
        batch = pyllama.Batch(a.size + b.size, n_seq_max=2).add(a, 0, 0).add(b, 0, 1)
        ctx.decode(batch)
        la, lb = np.array(ctx.logits(a.size - 1)), np.array(ctx.logits(a.size + b.size - 1))
        assert ctx.kv.pos_range(0) == (0, a.size - 1) and ctx.kv.pos_range(1) == (0, b.size - 1)
    with model.context(n_ctx=128) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(a))
        assert np.allclose(ctx.logits(-1), la, atol=1e-4)
        ctx.kv.clear()
        ctx.decode(pyllama.Batch.from_tokens(b))
        assert np.allclose(ctx.logits(-1), lb, atol=1e-4)


def test_perf_counters(model: pyllama.Model) -> None:
    with model.context(n_ctx=128) as ctx:
        pyllama.generate_text(ctx, "Hello world", max_tokens=5)
        perf = ctx.perf()
        assert perf.n_p_eval == model.tokenize("Hello world").size
        assert perf.n_eval == 4  # the 5th token is sampled, never decoded
        ctx.reset_perf()
        assert ctx.perf().n_eval <= 1  # llama_perf_context reports at least 1


def test_abort_from_another_thread_leaves_context_usable(model: pyllama.Model) -> None:
    with model.context(n_ctx=512, n_batch=512, n_ubatch=8) as ctx:
        toks = np.resize(model.tokenize("Hello world", add_special=False), 500).astype(np.int32)
        ctx.abort()  # a flag set before decode is cleared by decode itself
        ctx.decode(pyllama.Batch.from_tokens(toks[:4]))
        ctx.kv.clear()
        done = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                for _ in range(200):
                    ctx.kv.clear()
                    ctx.decode(pyllama.Batch.from_tokens(toks))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            done.set()

        t = threading.Thread(target=run)
        t.start()
        while not done.is_set():
            ctx.abort()
            done.wait(0.001)
        join_all([t])
        assert errors and isinstance(errors[0], pyllama.DecodeAbortedError)
        assert ctx.kv.pos_range(0) is None  # partial work removed
        assert pyllama.generate_text(ctx, "Hello", max_tokens=3)


def test_knobs_reach_llama_cpp(model: pyllama.Model) -> None:
    with model.context(n_ctx=512, n_batch=64, n_ubatch=32, n_threads=1, n_threads_batch=2,
                       flash_attn="off", type_k="q8_0", type_v="f16", n_seq_max=2) as ctx:
        assert (ctx.n_ctx, ctx.n_batch, ctx.n_ubatch, ctx.n_seq_max) == (512, 64, 32, 2)
        assert ctx.n_ctx_seq == 256
        assert (ctx.n_threads, ctx.n_threads_batch) == (1, 2)
        ctx.set_threads(2)
        assert ctx.n_threads == 2
        assert pyllama.generate_text(ctx, "Hello", max_tokens=3)
