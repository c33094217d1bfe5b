"""Tokenization throughput on the starter vocabulary: a batch across threads, and long texts.

- ``tokenize_many`` splits a batch of documents across threads (the GIL is
  released inside ``llama_tokenize``); the ratio of its 1-thread and 2-thread
  medians is its scaling.
- A 1 MB text in one ``llama_tokenize`` call against ``Vocab.tokenize``, which
  cuts long texts where newline runs start (identical ids; see vocab.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import SUMMARY

import pyllama
from pyllama._ffi import ffi, lib

_RESULTS: dict[str, float] = {}


def _corpus(n_docs: int, words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = ["the", "model", " tokens", "llama.cpp", "Python", "\n", "\n\n", "naïve", "🙂", "1234", "(x)", ","]
    return [" ".join(rng.choice(vocab, size=words)) for _ in range(n_docs)]


@pytest.mark.parametrize("threads", [1, 2])
def test_tokenize_many(benchmark: Any, starter_model: pyllama.Model, threads: int) -> None:
    docs = _corpus(64, 2000)
    out = benchmark(starter_model.vocab.tokenize_many, docs, n_threads=threads)
    n = sum(a.size for a in out)
    _RESULTS[f"many{threads}"] = benchmark.stats.stats.median
    benchmark.extra_info["tokens_per_s"] = round(n / benchmark.stats.stats.median)
    if "many1" in _RESULTS and "many2" in _RESULTS:
        SUMMARY.append(f"tokenize_many, 64 docs: 2 threads x{_RESULTS['many1'] / _RESULTS['many2']:.2f} over 1")


def _one_call(vocab: pyllama.Vocab, data: bytes) -> int:
    out = np.empty(len(data) + 2, dtype=np.int32)
    return int(lib.llama_tokenize(vocab._v(), data, len(data), ffi.from_buffer("llama_token[]", out), out.size,
                                  True, False))


@pytest.mark.parametrize("how", ["one llama_tokenize call", "Vocab.tokenize"])
def test_tokenize_1mb(benchmark: Any, starter_model: pyllama.Model, how: str) -> None:
    text = "\n".join(_corpus(500, 300, seed=1))[:1_000_000]
    data = text.encode()
    if how == "Vocab.tokenize":
        n = benchmark(lambda: starter_model.vocab.tokenize(data).size)
    else:
        n = benchmark(_one_call, starter_model.vocab, data)
    _RESULTS[how] = benchmark.stats.stats.median
    benchmark.extra_info["tokens_per_s"] = round(n / benchmark.stats.stats.median)
    if len([k for k in _RESULTS if "tokenize" in k]) == 2:
        SUMMARY.append(f"1 MB text: Vocab.tokenize x{_RESULTS['one llama_tokenize call'] / _RESULTS['Vocab.tokenize']:.2f}"
                       " over one llama_tokenize call (identical ids)")
