"""Per-token overhead of streaming from a pyllama.Worker child over in-process generation.

The same loop as ``test_tg_generate_greedy`` (64-cell context, one thread,
63 greedy tokens after one prompt token, detokenized) runs in process and in
a worker; the worker's tokens cross a pipe one by one (a pickle frame each,
a reader thread, a queue hand-off). The difference per token is the price of
isolation; the summary prints it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import GENERATION, SUMMARY, THREADS

import pyllama

N = 64
CTX = {"n_ctx": N, "n_batch": 2048, "n_ubatch": 512, "n_threads": THREADS, "n_threads_batch": THREADS,
       "swa_full": False}
_PER_TOKEN: dict[str, float] = {}


@pytest.fixture(scope="module")
def worker(synth_path: Path) -> Iterator[pyllama.Worker]:
    with pyllama.Worker(log_level="WARNING") as w:
        w.load(synth_path, n_gpu_layers=0, **CTX)
        yield w


def _record(name: str, benchmark: Any, model: Path) -> None:
    us = benchmark.stats.stats.median / (N - 1) * 1e6
    _PER_TOKEN[name] = us
    GENERATION.setdefault("per_token", {})[name] = us
    GENERATION.update(model=model, n=N)
    benchmark.extra_info["us_per_token"] = round(us, 2)
    if len(_PER_TOKEN) == 2:
        local, remote = _PER_TOKEN["in-process generate"], _PER_TOKEN["worker generate"]
        SUMMARY.append(f"worker streaming: {remote:.1f} µs per token against {local:.1f} in process: "
                       f"+{remote - local:.1f} µs per token for running the model in a child process")


def test_tg_in_process_reference(benchmark: Any, synth_model: pyllama.Model) -> None:
    """pyllama.generate in this process, for the comparison below."""
    with synth_model.context(**CTX) as ctx:
        def run() -> None:
            with pyllama.generate(ctx, [1], max_tokens=N - 1, reuse_prefix=False) as gen:
                for _ in gen:
                    pass

        run()
        benchmark(run)
    _record("in-process generate", benchmark, synth_model.path)


def test_tg_worker_generate(benchmark: Any, worker: pyllama.Worker, synth_path: Path) -> None:
    """The same generation in a worker child, every token streamed back as it is produced."""
    def run() -> None:
        with worker.generate([1], max_tokens=N - 1, reuse_prefix=False) as gen:
            for _ in gen:
                pass
        assert gen.n_generated == N - 1 or gen.finish_reason == "eog"

    run()
    benchmark(run)
    _record("worker generate", benchmark, synth_path)
