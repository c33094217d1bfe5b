"""Costs of single API calls: tokenization, sampling, logits, state, batches, model load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SUMMARY, THREADS

import pyllama
from pyllama._ffi import lib

TEXT = (
    "The quick brown fox jumps over the lazy dog. Benchmarks measure what they measure, "
    "and nothing else; a binding should add as little as it can to the native loop. "
    "Ünïcödé, emoji 🙂 and numbers 1234567890 keep the tokenizer honest.\n"
) * 40  # about 9 KB


@pytest.fixture(params=["synth", "starter"])
def model(request: pytest.FixtureRequest) -> pyllama.Model:
    m: pyllama.Model = request.getfixturevalue(f"{request.param}_model")
    return m


@pytest.fixture()
def ctx(model: pyllama.Model) -> Iterator[pyllama.Context]:
    with model.context(n_ctx=512, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS, no_perf=True) as c:
        toks = np.arange(1, 65, dtype=np.int32) % model.vocab.n_tokens
        c.decode(pyllama.Batch.from_tokens(toks, logits="all"))
        yield c


# --- tokenization ---------------------------------------------------------------------------
def test_tokenize(benchmark: Any, model: pyllama.Model) -> None:
    toks = benchmark(model.tokenize, TEXT)
    s = benchmark.stats.stats.median
    benchmark.extra_info.update(n_tokens=int(toks.size), mb_per_s=round(len(TEXT.encode()) / s / 1e6, 2),
                                tokens_per_s=round(toks.size / s))
    SUMMARY.append(f"tokenize {model.description!r}: {toks.size / s / 1e6:.2f} M tokens/s, "
                   f"{len(TEXT.encode()) / s / 1e6:.1f} MB/s")


def test_detokenize(benchmark: Any, model: pyllama.Model) -> None:
    toks = model.tokenize(TEXT, add_special=False)
    benchmark(model.detokenize, toks)
    benchmark.extra_info["tokens_per_s"] = round(toks.size / benchmark.stats.stats.median)


# --- sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("chain", ["greedy", "default"])
def test_sampler_chain(benchmark: Any, ctx: pyllama.Context, chain: str) -> None:
    """SamplerChain.sample on the last row's logits (default chain: top-k 40, top-p, min-p, temp, dist)."""
    specs = [pyllama.Greedy()] if chain == "greedy" else pyllama.default_chain(seed=1)
    smpl = pyllama.SamplerChain(specs, ctx.model)
    benchmark(smpl.sample, ctx, -1)
    benchmark.extra_info["n_vocab"] = ctx.n_vocab


def test_sampler_chain_raw(benchmark: Any, ctx: pyllama.Context) -> None:
    """The same default chain called as llama_sampler_sample directly: the native floor."""
    smpl = pyllama.SamplerChain(pyllama.default_chain(seed=1), ctx.model)
    chain, p = smpl._p(), ctx._p()
    benchmark(lib.llama_sampler_sample, chain, p, -1)


# --- logits -----------------------------------------------------------------------------------
def test_logits_view(benchmark: Any, ctx: pyllama.Context) -> None:
    benchmark(ctx.logits, -1)


def test_logits_copy(benchmark: Any, ctx: pyllama.Context) -> None:
    benchmark(lambda: np.array(ctx.logits(-1)))


def test_logits_all_64_rows(benchmark: Any, ctx: pyllama.Context) -> None:
    arr = benchmark(ctx.logits_all)
    assert arr.shape[0] == 64


# --- state ------------------------------------------------------------------------------------
def test_state_save(benchmark: Any, ctx: pyllama.Context) -> None:
    data = benchmark(ctx.state.save)
    benchmark.extra_info["bytes"] = len(data)


def test_state_load(benchmark: Any, ctx: pyllama.Context) -> None:
    data = ctx.state.save()
    benchmark(ctx.state.load, data)
    benchmark.extra_info["bytes"] = len(data)


def test_state_seq_roundtrip(benchmark: Any, ctx: pyllama.Context) -> None:
    data = ctx.state.save_seq(0)
    benchmark(lambda: ctx.state.load_seq(ctx.state.save_seq(0), 0))
    benchmark.extra_info["bytes"] = len(data)


# --- batches ------------------------------------------------------------------------------------
TOKS512 = np.arange(512, dtype=np.int32) % 500


def test_batch_from_tokens_512(benchmark: Any) -> None:
    benchmark(pyllama.Batch.from_tokens, TOKS512)


def test_batch_reuse_add_512(benchmark: Any) -> None:
    b = pyllama.Batch(512)
    benchmark(lambda: b.clear().add(TOKS512, 0, 0, logits="last"))


def test_batch_reuse_add_1(benchmark: Any) -> None:
    b = pyllama.Batch(1)
    one = TOKS512[:1]
    benchmark(lambda: b.clear().add(one, 7, 0, logits="all"))


# --- model load ---------------------------------------------------------------------------------
def test_model_load_synth(benchmark: Any, synth_path: Path) -> None:
    def load() -> None:
        pyllama.Model(synth_path, n_gpu_layers=0).close()
    benchmark(load)


def test_model_load_starter(benchmark: Any, starter_path: Path) -> None:
    def load() -> None:
        pyllama.Model(starter_path, n_gpu_layers=0).close()
    benchmark.pedantic(load, rounds=5, iterations=1, warmup_rounds=1)
