"""Per-token overhead of pyllama.generate and pyllama.agenerate over the C loop, interleaved.

bench/micro/test_generation.py times each loop in its own pytest-benchmark test,
one after the other, so a drift of the machine between tests (±1 µs per token on
the development VM) shows up as overhead. Here the three loops alternate within
every round (C, generate, agenerate, C, ...), each round takes the median of
``--reps`` runs of each, and the overhead is the median over rounds of the
paired differences, with their spread. The loops are those of the micro-benchmark:
the synthetic model, 64 tokens from an empty cache, one thread.

    python bench/overhead.py [--rounds 21] [--reps 60] [--threads 1]
    python bench/overhead.py -m MODEL -ngl all     # another model, offloaded (tools/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import synth  # noqa: E402

import pyllama  # noqa: E402
from pyllama._ffi import ffi, lib  # noqa: E402

N = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-m", "--model", default=None, help="GGUF path (default: the synthetic model, written here)")
    ap.add_argument("-ngl", "--n-gpu-layers", default="0", help="0 (the default), all, auto or a number")
    args = ap.parse_args()
    ngl = args.n_gpu_layers if args.n_gpu_layers in ("all", "auto") else int(args.n_gpu_layers)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or synth.write_llama_model(Path(tmp) / "llama.gguf")
        with pyllama.Model(path, n_gpu_layers=ngl) as model, \
                model.context(n_ctx=N, n_batch=2048, n_ubatch=512, n_threads=args.threads,
                              n_threads_batch=args.threads, swa_full=False, no_perf=True) as ctx:
            return _run(model, ctx, args.rounds, args.reps)


def _run(model: pyllama.Model, ctx: pyllama.Context, rounds: int, reps: int) -> int:
    chain = pyllama.SamplerChain([pyllama.Greedy()], model)
    out = np.empty(N - 1, dtype=np.int32)
    first = pyllama.Batch.from_tokens([1], 0, 0)
    loop = asyncio.new_event_loop()

    def c_loop() -> None:
        ctx.kv.clear()
        ctx.decode(first)
        lib.pyllama_c_generate_loop(ctx._p(), chain._p(), 1, N - 1, ffi.from_buffer("llama_token[]", out))

    def gen() -> None:
        ctx.kv.clear()
        with pyllama.generate(ctx, [1], max_tokens=N - 1, reuse_prefix=False) as g:
            for _ in g:
                pass

    async def consume() -> None:
        async for _ in pyllama.agenerate(ctx, [1], max_tokens=N - 1, reuse_prefix=False):
            pass

    def agen() -> None:
        ctx.kv.clear()
        loop.run_until_complete(consume())

    loops: dict[str, Callable[[], None]] = {"C sample+decode loop": c_loop, "pyllama.generate": gen,
                                            "pyllama.agenerate": agen}
    c_loop()
    reference = out.copy()
    with pyllama.generate(ctx, [1], max_tokens=N - 1, reuse_prefix=False) as g:
        for _ in g:
            pass
        if not np.array_equal(g.tokens, reference[: g.n_generated]):
            print("token ids differ between generate and the C loop", file=sys.stderr)
            return 1
    per_token: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(rounds):
        for name, fn in loops.items():
            fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            per_token[name].append(statistics.median(times) / (N - 1) * 1e6)
    loop.close()
    chain.close()
    base = per_token["C sample+decode loop"]
    print(f"{Path(model.path).name} (n_gpu_layers={model.n_gpu_layers}), {N} tokens per loop, {rounds} interleaved rounds of {reps} runs each; µs per token")
    for name, values in per_token.items():
        line = f"  {name:22s} {statistics.median(values):7.2f}"
        if values is not base:
            diff = sorted(v - b for v, b in zip(values, base))
            q1, q3 = diff[len(diff) // 4], diff[(3 * len(diff)) // 4]
            line += (f"   +{statistics.median(diff):.2f} over the C loop (paired median; "
                     f"IQR {q1:.2f}..{q3:.2f}, range {diff[0]:.2f}..{diff[-1]:.2f})")
        print(line)
    g_minus = sorted(a - g for a, g in zip(per_token["pyllama.agenerate"], per_token["pyllama.generate"]))
    print(f"  agenerate over generate: +{statistics.median(g_minus):.2f} µs per token (paired median; "
          f"range {g_minus[0]:.2f}..{g_minus[-1]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
