"""Parallel sequences on the starter model: generate_parallel against llama-batched-bench, interleaved.

The shape is bench/parallel.py's: PL sequences, 32-token prompts, 64 generated
tokens each, end of generation ignored, 2 threads, flash attention auto; the figure
is llama-batched-bench's (generated tokens over the whole time, prefill included).
pytest-benchmark times ``generate_parallel_tokens``; each round's untimed set-up
runs ``llama-batched-bench`` first, so the two alternate, and the summary gives
the ratio of each pair. llama-batched-bench never samples (it feeds random
tokens); pyllama samples and detokenizes every row.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SUMMARY, load_bench, native_tool_or_skip

import pyllama

THREADS, N_CTX, PP, TG, ROUNDS = 2, 4096, 32, 64, 5


@pytest.mark.parametrize("pl", [4, 8])
def test_generate_parallel_vs_batched_bench(benchmark: Any, starter_as_native: pyllama.Model, starter_path: Path,
                                            pl: int) -> None:
    native_tool_or_skip("llama-batched-bench")
    model = starter_as_native
    bench_parallel = load_bench("parallel")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.vocab.n_tokens, size=PP, dtype=np.int32) for _ in range(pl)]
    theirs: list[float] = []
    ours: list[float] = []

    def setup() -> None:
        theirs.append(bench_parallel.native(str(starter_path), THREADS, N_CTX, PP, TG, pl))

    def timed() -> None:
        ours.append(bench_parallel.ours(ctx, prompts, TG))

    with model.context(n_ctx=N_CTX, n_seq_max=pl, n_threads=THREADS, n_threads_batch=THREADS,
                       flash_attn="auto") as ctx:
        bench_parallel.ours(ctx, prompts, 4)  # warm-up, both sides
        bench_parallel.native(str(starter_path), THREADS, N_CTX, PP, 4, pl)
        benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, iterations=1)
    ratios = [y / x for x, y in zip(theirs, ours)]
    benchmark.extra_info.update(tokens_per_s=round(statistics.median(ours), 2),
                                vs_batched_bench=round(statistics.median(ratios), 3))
    SUMMARY.append(f"generate_parallel, {pl} sequences (pp {PP}, tg {TG}, {THREADS} threads, {ROUNDS} interleaved "
                   f"pairs), generated t/s median [min-max]: llama-batched-bench {statistics.median(theirs):.2f} "
                   f"[{min(theirs):.2f}-{max(theirs):.2f}], generate_parallel {statistics.median(ours):.2f} "
                   f"[{min(ours):.2f}-{max(ours):.2f}]; ratio x{statistics.median(ratios):.3f} "
                   f"[{min(ratios):.3f}-{max(ratios):.3f}]")
