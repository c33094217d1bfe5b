"""pyllama's benchmark runner: llama-bench's options, fields and semantics, through pyllama's API.

``pyllama bench ARGS`` (or ``python -m pyllama.benchmark ARGS``) takes
llama-bench's command line and prints records whose field names, JSON types
and meanings are those of the vendored ``tools/llama-bench/llama-bench.cpp``,
plus pyllama's own keys (``binding``, ``pyllama_version``, ``llama_commit``,
``machine``, ``environment``; see :data:`record.PYLLAMA_FIELDS`). With
``--native`` the same matrix also runs through llama.cpp's own llama-bench,
interleaved, and each pyllama record carries the pyllama/native ratio.

``pyllama.benchmark.tune`` sweeps threads, batch sizes, flash attention and KV
types for a model and prints the fastest settings as flags.
"""

from __future__ import annotations

from .cli import main, run
from .params import Instance, Params, UsageError, parse_args
from .record import LLAMA_BENCH_FIELDS, NATIVE_FIELDS, PYLLAMA_FIELDS, Record

__all__ = ["main", "run", "parse_args", "Params", "Instance", "Record", "UsageError",
           "LLAMA_BENCH_FIELDS", "PYLLAMA_FIELDS", "NATIVE_FIELDS"]
